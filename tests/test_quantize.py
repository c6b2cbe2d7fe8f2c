"""Weight-only quantisation (pali_jax/quantize.py): the machinery is exact (a quantised model computes
what float32 computes on its dequantised weights), quantising on load equals quantising after a
full load (safetensors, .npz, blocks of rows), converted quantised directories round-trip and
verify, the demo model keeps its answers, and bad requests are refused in one line with nothing
written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import assert_parity

from pali_jax import cli, quantize, sharding, weights
from pali_jax.backend import CHECKPOINT_LAYOUT, Layout
from pali_jax.demo import shapes
from pali_jax.errors import UserError
from pali_jax.paligemma import PaliGemmaModel, abstract_params
from pali_jax.pretrained import PaliGemma
from pali_jax.quantize import QVALUE, SCALE, Quantization
from pali_jax.weights import big_vision, materialise

DEMO = Path(__file__).resolve().parents[1] / "pali_jax" / "assets" / "demo" / "model"
SCHEMES = ("int8", "int4")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Gemma 1 PaliGemma saved by transformers (safetensors)."""
    return hf_models.save(hf_models.build("pg1", seed=5), tmp_path_factory.mktemp("q") / "hf")


def _dequantized(params):
    """The float32 tree a quantised tree stands for."""
    if quantize.is_quantized(params):
        return quantize.dequantize(params, jnp.float32)
    if isinstance(params, dict):
        return {k: _dequantized(v) for k, v in params.items()}
    return params


def _inputs(pg: PaliGemma, n_text: int = 6):
    cfg = pg.config
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    text = rng.integers(3, 100, (2, n_text))
    ids = np.concatenate([np.full((2, cfg.num_image_tokens), cfg.image_token_id), text], axis=1)
    types = np.concatenate([np.zeros((2, cfg.num_image_tokens + 3)), np.ones((2, n_text - 3))], axis=1)
    return pixels, ids, types.astype(np.int32)


def _equal_trees(a, b) -> None:
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# -- (a) the machinery is exact ------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_equal_float32_on_dequantized_weights(scheme):
    pg = PaliGemma.from_pretrained(DEMO, quantize=scheme)
    assert pg.layout.quant == Quantization(scheme)
    leaves = jax.tree_util.tree_flatten_with_path(pg.checkpoint_params())[0]
    qvalues = [x for p, x in leaves if p[-1].key == QVALUE]
    assert qvalues and {str(x.dtype) for x in qvalues} == ({"int8"} if scheme == "int8" else {"int8", "int4"})
    # held for the CPU's products: the int4 values one per int8 byte (backend.Layout.int4_bytes)
    held = {str(x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(pg.params)[0] if p[-1].key == QVALUE}
    assert pg.layout.int4_bytes == (jax.default_backend() == "cpu") and held == ({"int8"} if pg.layout.int4_bytes
                                                                               else {str(x.dtype) for x in qvalues})
    pixels, ids, types = _inputs(pg)
    ours = np.asarray(pg.forward(pixels, ids, types))
    float_layout = dataclasses.replace(pg.layout, quant=None)
    float_params = _dequantized(pg.params)
    # compiled as the model's programs are (the policy's options), so that the products' forms are the only difference
    program = jax.jit(PaliGemmaModel(pg.config, layout=float_layout, policy=pg.policy).apply,
                      compiler_options=pg.policy.compiler_options())
    ref = np.asarray(program({"params": float_params}, pixels, ids, types))
    # The judge where the two float32 runs' rounding differs (the CPU policy's tiled product sums in
    # another order than one dot): the float model in float64 (its products accumulated in float64;
    # norms and attention logits stay float32), as parity.py's rule asks.
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), float_params)
        ref64 = np.asarray(PaliGemmaModel(pg.config, jnp.float64, layout=float_layout, policy=pg.policy).apply(
            {"params": params64}, pixels.astype(np.float64), ids, types))
    assert_parity(ours, ref, ref64, what=f"{scheme} logits against float32 on the dequantised weights")


def test_scales_are_per_output_channel_and_per_group():
    w = np.random.default_rng(0).normal(size=(256, 3, 8)).astype(np.float32)  # [D, N, H], contracted D
    int8 = quantize.quantize(w, Quantization("int8"), (0,))
    assert int8[QVALUE].dtype == jnp.int8 and int8[SCALE].shape == (1, 3, 8)
    np.testing.assert_allclose(np.asarray(int8[SCALE])[0], np.abs(w).max(axis=0) / 127.5, rtol=1e-6)
    int4 = quantize.quantize(w, Quantization("int4", 64), (0,))
    assert int4[QVALUE].dtype == jnp.int4 and int4[SCALE].shape == (4, 3, 8)
    rebuilt = np.asarray(quantize.dequantize(int4))
    step = np.repeat(np.asarray(int4[SCALE]), 64, axis=0)
    assert (np.abs(rebuilt - w) <= step / 2 + 1e-7).all()  # rounding is the only error
    # attn_vec_einsum [N, H, D] contracts N and H: groups run along H within each head
    v = quantize.quantize(np.ones((4, 32, 8), np.float32), Quantization("int4", 16), (0, 1))
    assert v[SCALE].shape == (4, 2, 8)


def test_int4_packs_two_values_per_byte_and_round_trips():
    """`pack_int4`'s format (what cpu_kernels.cc reads): in each chunk of 128, little-endian word j
    holds values j, 32 + j, 64 + j, 96 + j as value + 8, low nibble first."""
    q = np.random.default_rng(3).integers(-8, 8, (3, 2, 256)).astype(np.int8)
    packed = np.asarray(quantize.pack_int4(jnp.asarray(q, jnp.int4)))
    assert packed.dtype == np.uint8 and packed.shape == (3, 2, 128)
    words = packed.reshape(3, 2, 2, 32, 2).astype(np.uint16)
    words = words[..., 0] | words[..., 1] << 8  # [3, 2, chunk, word]
    for nibble in range(4):
        want = q.reshape(3, 2, 2, 4, 32)[..., nibble, :] + 8
        np.testing.assert_array_equal((words >> (4 * nibble)) & 0xF, want)
    np.testing.assert_array_equal(np.asarray(quantize.unpack_int4(jnp.asarray(packed))), q)
    node = {QVALUE: jnp.asarray(packed), SCALE: jnp.ones((3, 2, 2), jnp.float32)}
    assert quantize.value_shape(node) == (3, 2, 256)
    np.testing.assert_array_equal(np.asarray(quantize.dequantize(node)), q.astype(np.float32))
    assert quantize.packable((3, 256), (3, 2)) and quantize.packable((3, 256), (3, 1))
    assert not quantize.packable((3, 256), (3, 4))  # groups of 64: not whole chunks
    assert not quantize.packable((256, 3), (2, 3))  # the last axis is not the grouped one


def test_packed_inference_layout_holds_the_checkpoint_values():
    """int4 in the packed layout (what bf16 inference holds on a CPU with the kernels) packs every
    weight whose groups allow it, and converts back to exactly the checkpoint's jnp.int4 tree."""
    packed_layout = Layout(stacked=False, out_first=True, int4_bytes=True, int4_packed=True)
    pg = PaliGemma.from_pretrained(DEMO, dtype="bfloat16", quantize="int4", layout=packed_layout)
    stored = {jnp.dtype(x.dtype) for x in jax.tree.leaves(pg.params["llm"])}
    assert jnp.dtype(jnp.uint8) in stored and jnp.dtype(jnp.int4) not in stored
    assert quantize.scheme_of(pg.params) == Quantization("int4", 128)
    plain = PaliGemma.from_pretrained(DEMO, dtype="bfloat16", quantize="int4", layout=CHECKPOINT_LAYOUT)
    _equal_trees(pg.checkpoint_params(), plain.params)


# -- (b) the demo model keeps its answers ---------------------------------------------------------
def test_demo_answers_on_fresh_scenes():
    """int8 answers equal the float model's on every prompt of fresh scenes; int4 on >= 95%
    (benchmarks/quantized.py runs 100 scenes)."""
    scenes = shapes.scenes(12, seed=777)
    images = [shapes.render(s) for s in scenes for _ in shapes.prompts(s)]
    prompts = [p for s in scenes for p, _ in shapes.prompts(s)]
    answers = {}
    for scheme in (None, *SCHEMES):
        pg = PaliGemma.from_pretrained(DEMO, quantize=scheme)
        answers[scheme] = [r.text for r in pg.generate(images, prompts, max_new_tokens=12, batch_size=64)]
    agree = {s: np.mean([a == b for a, b in zip(answers[s], answers[None])]) for s in SCHEMES}
    assert agree["int8"] == 1.0 and agree["int4"] >= 0.95, agree


# -- (c) quantise on load == quantise after a full load --------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_on_load_equals_quantize_after_load(hf_dir, tmp_path, monkeypatch, scheme):
    quant = Quantization(scheme, 32)
    config, full = weights.load(hf_dir, "float32")
    target = abstract_params(config, layout=dataclasses.replace(CHECKPOINT_LAYOUT, quant=quant))
    after = quantize.quantize_params(full, target)
    monkeypatch.setattr(materialise, "BLOCK_BYTES", 512)  # the table and norms come in many blocks of rows
    _, on_load = weights.load(hf_dir, "float32", quant=quant)
    _equal_trees(on_load, after)
    npz = big_vision.save_npz(tmp_path / "pg.npz", config, full)
    _, from_npz = weights.load(npz, "float32", quant=quant)
    npz_config, npz_full = weights.load(npz, "float32")  # big_vision's table has no padding rows
    npz_target = abstract_params(npz_config, layout=dataclasses.replace(CHECKPOINT_LAYOUT, quant=quant))
    after_npz = quantize.quantize_params(npz_full, npz_target)
    _equal_trees(from_npz, after_npz)
    # bfloat16 loads quantise the stored values, not their bfloat16 rounding
    _, in_bf16 = weights.load(hf_dir, "bfloat16", quant=quant)
    _equal_trees(jax.tree.map(lambda x: x, {"llm": {"embedder": in_bf16["llm"]["embedder"]}}),
                 {"llm": {"embedder": on_load["llm"]["embedder"]}})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_on_load_per_layer_equals_the_stacked_load(hf_dir, tmp_path, scheme):
    """weights.load(per_layer=True) (what from_pretrained reads for its per-layer layouts): each
    decoder layer quantised apart gives that layer of the stacked quantised tree."""
    quant = Quantization(scheme, 32)
    config, stacked = weights.load(hf_dir, "bfloat16", quant=quant)
    _, split = weights.load(hf_dir, "bfloat16", quant=quant, per_layer=True)
    layers = [split["llm"].pop(f"layers_{i}") for i in range(config.text.depth)]
    _equal_trees(jax.tree.map(lambda *xs: np.stack(xs), *layers), stacked["llm"].pop("layers"))
    _equal_trees(split, stacked)
    # big_vision's tensors hold every layer: read stacked whatever is asked
    npz = big_vision.save_npz(tmp_path / "pg.npz", *weights.load(hf_dir, "float32"))
    assert "layers" in weights.load(npz, "float32", quant=quant, per_layer=True)[1]["llm"]


# -- (d) a converted quantised directory round-trips ----------------------------------------------
def test_converted_quantized_directory_round_trips(hf_dir, tmp_path, capsys):
    dst = tmp_path / "q4"
    assert cli.main(["convert", str(hf_dir), str(dst), "--quantize", "int4", "--group-size", "32"]) == 0
    assert cli.main(["verify", str(dst)]) == 0
    assert "ok:" in capsys.readouterr().out
    loaded = PaliGemma.from_pretrained(dst)
    assert loaded.layout.quant == Quantization("int4", 32)
    direct = PaliGemma.from_pretrained(hf_dir, quantize="int4", group_size=32)
    _equal_trees(loaded.params, direct.params)
    pixels, ids, types = _inputs(loaded)
    np.testing.assert_array_equal(np.asarray(loaded.forward(pixels, ids, types)),
                                  np.asarray(direct.forward(pixels, ids, types)))
    # a float directory quantised as it is read gives the same tree
    float_dir = tmp_path / "f32"
    assert cli.main(["convert", str(hf_dir), str(float_dir)]) == 0
    _equal_trees(PaliGemma.from_pretrained(float_dir, quantize="int4", group_size=32).params, direct.params)
    # a changed scale is caught by verify
    scale_dir = next(p for p in (dst / "params").iterdir() if p.name.endswith("q_einsum.qscale"))
    chunk = next(p for p in scale_dir.iterdir() if not p.name.startswith("."))
    chunk.write_bytes(bytes(b ^ 1 for b in chunk.read_bytes()[:1]) + chunk.read_bytes()[1:])
    assert cli.main(["verify", str(dst)]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


# -- (e) bad requests: one line, nothing written --------------------------------------------------
def _one_line(error: BaseException) -> str:
    assert "\n" not in str(error)
    return str(error)


def test_bad_requests_are_refused(hf_dir, tmp_path, capsys):
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(DEMO, quantize="int3")
    assert "unknown quantization 'int3'" in _one_line(info.value)
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(hf_dir, quantize="int4", group_size=48)  # 48 divides neither 64 nor 96
    assert "does not divide" in _one_line(info.value)
    before = sorted(tmp_path.iterdir())
    for options in (["--quantize", "int3"], ["--quantize", "int4", "--group-size", "48"], ["--group-size", "32"]):
        assert cli.main(["convert", str(hf_dir), str(tmp_path / "out"), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert sorted(tmp_path.iterdir()) == before  # nothing written, no temporary left
    assert cli.main(["generate", "--model", str(DEMO), "--quantize", "int3", "--prompt", "caption en"]) == 2
    assert "unknown quantization" in capsys.readouterr().err
    # quantising an already quantised directory or tree
    q8 = tmp_path / "q8"
    assert cli.main(["convert", str(hf_dir), str(q8), "--quantize", "int8"]) == 0
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(q8, quantize="int4")
    assert "already quantized" in _one_line(info.value)
    pg = PaliGemma.from_pretrained(q8)
    target = abstract_params(pg.config, layout=dataclasses.replace(CHECKPOINT_LAYOUT, quant=Quantization("int4")))
    with pytest.raises(UserError) as info:
        quantize.quantize_params(pg.checkpoint_params(), target)
    assert "already quantized" in _one_line(info.value)
    capsys.readouterr()
    assert cli.main(["export-big-vision", str(q8), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is quantized" in err and "\n" not in err and not (tmp_path / "x.npz").exists()


def test_a_mesh_that_splits_a_group_is_refused():
    cfg = PaliGemma.from_pretrained(DEMO).config
    layout = dataclasses.replace(CHECKPOINT_LAYOUT, quant=Quantization("int4", 128))
    abstract = abstract_params(cfg, layout=layout)
    ok = sharding.param_specs(abstract, sharding.abstract_mesh("fsdp=2"), min_elements=0)
    # the scales of q_einsum [L, D, N, H] follow its values: D split in two, two groups of 128 each
    q = ok["llm"]["layers"]["attn"]["q_einsum"]
    assert q[QVALUE] == jax.sharding.PartitionSpec(None, "fsdp") and q[SCALE] == q[QVALUE]
    with pytest.raises(UserError) as info:  # D = 256 over 4 devices: 64 rows each, half a group
        sharding.param_specs(abstract, sharding.abstract_mesh("fsdp=4"), min_elements=0)
    assert "cutting its int4 groups of 128" in _one_line(info.value)
