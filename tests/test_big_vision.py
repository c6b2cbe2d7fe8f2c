"""big_vision `.npz` checkpoints: tiny PaliGemma 1 and 2 written as big_vision saves them (its names
and layouts, written out here from transformers' weights), converted, and compared with the same
weights loaded through the HF path; the round trip HF -> pali-jax -> npz -> pali-jax; bad files."""

from __future__ import annotations

import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

import hf_models
from pali_jax import cli
from pali_jax.conversion import convert_big_vision, convert_hf
from pali_jax.weights import WeightError, to_host
from pali_jax.weights import big_vision as bvw
from pali_jax.weights.npz import Member
from pali_jax.config import PaliGemmaConfig, preset
from pali_jax.errors import UserError
from pali_jax.paligemma import abstract_params
from pali_jax.pretrained import PaliGemma

ROWS = hf_models.IMAGE_TOKEN_ID  # big_vision's table stops before <image> (257152 for real checkpoints)
BF16 = np.dtype(ml_dtypes.bfloat16)


def big_vision_tree(model, per_layer: bool = False) -> dict[str, np.ndarray]:
    """What big_vision's PaliGemma holds for these weights: its names, its layouts (see
    big_vision models/proj/paligemma, models/vit.py, models/ppp/gemma.py), float32."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    tv, tt = cfg.vision_config, cfg.text_config
    n_v, h_v = tv.num_attention_heads, tv.hidden_size // tv.num_attention_heads
    n, k, h = tt.num_attention_heads, tt.num_key_value_heads, tt.head_dim
    gemma2 = tt.model_type == "gemma2"
    vis, lm = "model.vision_tower.", "model.language_model."
    tree = {
        "img/embedding/kernel": sd[vis + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "img/embedding/bias": sd[vis + "embeddings.patch_embedding.bias"],
        "img/pos_embedding": sd[vis + "embeddings.position_embedding.weight"][None],
        "img/Transformer/encoder_norm/scale": sd[vis + "post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": sd[vis + "post_layernorm.bias"],
        "img/head/kernel": sd["model.multi_modal_projector.linear.weight"].T,
        "img/head/bias": sd["model.multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": sd[lm + "embed_tokens.weight"][:ROWS],
        "llm/final_norm/scale": sd[lm + "norm.weight"],
    }
    vit_layers, llm_layers = [], []
    for i in range(tv.num_hidden_layers):
        p = f"{vis}encoder.layers.{i}."
        a = "MultiHeadDotProductAttention_0/"
        block = {
            "LayerNorm_0/scale": sd[p + "layer_norm1.weight"], "LayerNorm_0/bias": sd[p + "layer_norm1.bias"],
            "LayerNorm_1/scale": sd[p + "layer_norm2.weight"], "LayerNorm_1/bias": sd[p + "layer_norm2.bias"],
            "MlpBlock_0/Dense_0/kernel": sd[p + "mlp.fc1.weight"].T, "MlpBlock_0/Dense_0/bias": sd[p + "mlp.fc1.bias"],
            "MlpBlock_0/Dense_1/kernel": sd[p + "mlp.fc2.weight"].T, "MlpBlock_0/Dense_1/bias": sd[p + "mlp.fc2.bias"],
            a + "out/kernel": sd[p + "self_attn.out_proj.weight"].T.reshape(n_v, h_v, -1),
            a + "out/bias": sd[p + "self_attn.out_proj.bias"],
        }
        for hf, bv in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            block[a + bv + "/kernel"] = sd[p + f"self_attn.{hf}.weight"].T.reshape(-1, n_v, h_v)
            block[a + bv + "/bias"] = sd[p + f"self_attn.{hf}.bias"].reshape(n_v, h_v)
        vit_layers.append(block)
    for i in range(tt.num_hidden_layers):
        p = f"{lm}layers.{i}."
        heads = lambda w, m: w.reshape(m, h, -1).transpose(0, 2, 1)  # noqa: E731  [m*h, D] -> [m, D, h]
        block = {
            "pre_attention_norm/scale": sd[p + "input_layernorm.weight"],
            "attn/q_einsum/w": heads(sd[p + "self_attn.q_proj.weight"], n),
            "attn/kv_einsum/w": np.stack([heads(sd[p + "self_attn.k_proj.weight"], k),
                                          heads(sd[p + "self_attn.v_proj.weight"], k)]),
            "attn/attn_vec_einsum/w": sd[p + "self_attn.o_proj.weight"].reshape(-1, n, h).transpose(1, 2, 0),
            "mlp/gating_einsum": np.stack([sd[p + "mlp.gate_proj.weight"].T, sd[p + "mlp.up_proj.weight"].T]),
            "mlp/linear": sd[p + "mlp.down_proj.weight"].T,
        }
        if gemma2:
            block |= {"post_attention_norm/scale": sd[p + "post_attention_layernorm.weight"],
                      "pre_ffw_norm/scale": sd[p + "pre_feedforward_layernorm.weight"],
                      "post_ffw_norm/scale": sd[p + "post_feedforward_layernorm.weight"]}
        else:
            block["pre_ffw_norm/scale"] = sd[p + "post_attention_layernorm.weight"]
        llm_layers.append(block)
    for name in vit_layers[0]:
        if per_layer:
            tree |= {f"img/Transformer/encoderblock_{i}/{name}": b[name] for i, b in enumerate(vit_layers)}
        else:
            tree[f"img/Transformer/encoderblock/{name}"] = np.stack([b[name] for b in vit_layers])
    for name in llm_layers[0]:
        if per_layer:
            tree |= {f"llm/layers/{i}/{name}": b[name] for i, b in enumerate(llm_layers)}
        else:
            tree[f"llm/layers/{name}"] = np.stack([b[name] for b in llm_layers])
    return tree


def save_like_big_vision(path: Path, tree: dict[str, np.ndarray], dtype=np.float32, prefix: str = "params/") -> Path:
    """np.savez of the flat tree, as big_vision writes it: bfloat16 ends up as 2-byte void."""
    arrays = {}
    for name, value in tree.items():
        v = np.ascontiguousarray(value)
        v = v.astype(dtype) if dtype is not None and v.dtype.kind == "f" else v
        arrays[prefix + name] = v.view(np.dtype("V2")) if v.dtype == BF16 else v
    np.savez(path, **arrays)
    return path


def _round_to_bf16(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for seed, kind in enumerate(("pg1", "pg2")):
        model = hf_models.build(kind, seed=10 + seed)
        if kind == "pg2":
            _round_to_bf16(model)  # its npz is written in bfloat16: the HF reference holds the same values
        root = tmp_path_factory.mktemp(kind)
        out[kind] = dict(model=model, hf_dir=hf_models.save(model, root / "hf"), root=root)
    return out


def _inputs(cfg: PaliGemmaConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    text = rng.integers(3, ROWS, (2, 9))
    ids = np.concatenate([np.full((2, cfg.num_image_tokens), cfg.image_token_id), np.full((2, 1), 2), text], 1)
    types = np.zeros_like(ids)
    types[:, -4:] = 1
    return pixels, ids.astype(np.int32), types


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind, dtype, per_layer, prefix", [
    ("pg1", np.float32, False, "params/"),
    ("pg2", BF16, True, ""),
])
def test_npz_logits_match_hf_path(models, kind, dtype, per_layer, prefix):
    m = models[kind]
    npz = save_like_big_vision(m["root"] / f"{kind}.npz", big_vision_tree(m["model"], per_layer), dtype, prefix)
    hf_cfg = PaliGemmaConfig.from_hf(m["hf_dir"])  # what shapes cannot tell: the tiny caps and query scale
    out = m["root"] / f"{kind}-from-npz"
    if kind == "pg1":  # Gemma 1: the shapes say everything (no caps, query scale 1/sqrt(head_dim))
        assert cli.main(["convert-big-vision", str(npz), str(out), "--dtype", "float32"]) == 0
    else:  # the tiny Gemma 2's caps and query scale are no preset's: given as a config
        convert_big_vision(npz, out, preset=hf_cfg, dtype="float32")
    ours = PaliGemma.from_pretrained(out)
    assert ours.config.vocab_size == ROWS and ours.config.image_token_id == ROWS
    assert ours.config.text.sliding_window is None
    ref = PaliGemma.from_pretrained(m["hf_dir"], sliding_window=False)
    pixels, ids, types = _inputs(ours.config)
    got = np.asarray(ours.forward(pixels, ids, types))
    want = np.asarray(ref.forward(pixels, ids, types))[..., :ROWS]
    assert got.shape == want.shape
    assert _rel_l2(got, want) <= 1e-5, _rel_l2(got, want)
    # The library reads the npz in place as well: PaliGemma.from_pretrained("x.npz") (Gemma 1: no preset needed).
    if kind == "pg1":
        direct = PaliGemma.from_pretrained(npz)
        config, host = direct.config, direct.checkpoint_params()
    else:
        plan = bvw.plan(npz, "float32", hf_cfg)
        config, host = plan.config, to_host(plan)
    assert config == ours.config
    for (keys, a), b in zip(jax.tree_util.tree_flatten_with_path(host)[0], jax.tree.leaves(ours.checkpoint_params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(keys))


def test_round_trip_is_exact(models, tmp_path):
    m = models["pg2"]
    converted = convert_hf(m["hf_dir"], tmp_path / "ours")
    npz = tmp_path / "bv.npz"
    assert cli.main(["export-big-vision", str(converted), str(npz)]) == 0
    # The exported file is what big_vision holds for these weights: names, layouts, bits.
    expected = big_vision_tree(m["model"])
    with np.load(npz, allow_pickle=False) as f:
        assert sorted(f.files) == sorted("params/" + k for k in expected)
        for name, value in expected.items():
            got = f["params/" + name]
            assert got.dtype == np.float32 and got.shape == value.shape, name
            np.testing.assert_array_equal(got, value, err_msg=name)
    back = tmp_path / "back"
    assert cli.main(["convert-big-vision", str(npz), str(back), "--preset", "paligemma2-3b-224"]) == 2  # shapes differ
    convert_big_vision(npz, back, preset=PaliGemmaConfig.from_hf(m["hf_dir"]))
    a, b = PaliGemma.from_pretrained(converted), PaliGemma.from_pretrained(back)
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a.params)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b.params)[0])
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        if "input_embedding" in str(key):  # big_vision's table has no <image> row and no padding rows
            assert x.shape[0] == hf_models.VOCAB_SIZE and y.shape[0] == ROWS
            x = x[:ROWS]
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=str(key))
    # And npz -> pali-jax -> npz gives the same file contents, in bfloat16 too.
    bf16_npz = tmp_path / "bf16.npz"
    assert cli.main(["export-big-vision", str(back), str(bf16_npz), "--dtype", "bfloat16"]) == 0
    again = tmp_path / "again"
    convert_big_vision(bf16_npz, again, preset=PaliGemmaConfig.from_hf(m["hf_dir"]))
    again_npz = tmp_path / "again.npz"
    assert cli.main(["export-big-vision", str(again), str(again_npz)]) == 0
    with np.load(bf16_npz, allow_pickle=False) as f, np.load(again_npz, allow_pickle=False) as g:
        assert sorted(f.files) == sorted(g.files)
        for name in f.files:
            assert f[name].dtype == np.dtype("V2") and g[name].dtype == np.dtype("V2"), name
            assert f[name].tobytes() == g[name].tobytes(), name


def _fake_members(cfg: PaliGemmaConfig) -> dict[str, Member]:
    """Headers of a big_vision file for a full-size config, without any data."""
    abstract = abstract_params(cfg)
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), BF16), s.shape), abstract)
    return {name: Member(Path("fake.npz"), name + ".npy", name, arr.shape, BF16, False)
            for name, arr in bvw.big_vision_arrays(cfg, zeros)}


@pytest.mark.parametrize("name, scalar, caps", [
    ("paligemma-3b-224", 256.0, (None, None)),
    ("paligemma2-3b-448", 256.0, (50.0, 30.0)),
    ("paligemma2-10b-224", 256.0, (50.0, 30.0)),
    ("paligemma2-28b-896", 144.0, (50.0, 30.0)),
])
def test_config_from_full_size_shapes(name, scalar, caps):
    members = _fake_members(preset(name))
    assert members["llm/embedder/input_embedding"].shape[0] == 257152
    cfg = bvw.config_from_shapes(members)
    want = preset(name)
    assert cfg.vision == want.vision
    t = cfg.text
    assert (t.width, t.depth, t.num_heads, t.num_kv_heads, t.head_dim, t.mlp_dim, t.post_norms) == (
        want.text.width, want.text.depth, want.text.num_heads, want.text.num_kv_heads, want.text.head_dim,
        want.text.mlp_dim, want.text.post_norms)
    assert t.query_pre_attn_scalar == scalar and (t.attn_logit_softcap, t.final_logit_softcap) == caps
    assert t.sliding_window is None and cfg.vocab_size == 257152 and cfg.image_token_id == 257152
    assert bvw.config_from_shapes(members, final_logit_softcap=False).text.final_logit_softcap is None
    assert bvw.config_from_shapes(members, name) == cfg


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def _refused(capsys, npz: Path, *options: str) -> str:
    """pali-jax convert-big-vision NPZ DST: exit 2, one line, nothing written beside NPZ."""
    before = sorted(npz.parent.iterdir())
    dst = npz.parent / "dst"
    rc = cli.main(["convert-big-vision", str(npz), str(dst), *options])
    assert rc == 2 and not dst.exists()
    assert sorted(npz.parent.iterdir()) == before  # no temporary left
    return _error(capsys)


def _refused_by_from_pretrained(npz: Path) -> str:
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(npz)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_files(models, tmp_path, capsys):
    m = models["pg1"]
    tree = big_vision_tree(m["model"])
    hf_cfg = PaliGemmaConfig.from_hf(m["hf_dir"])

    def run(npz: Path, *options: str) -> str:
        return _refused(capsys, npz, *options)

    missing = dict(tree)
    del missing["llm/layers/mlp/linear"]
    assert "llm/layers/mlp/linear" in run(save_like_big_vision(tmp_path / "missing.npz", missing))
    extra = dict(tree, **{"llm/layers/attn/extra/w": np.zeros(3, np.float32)})
    assert "unexpected array 'llm/layers/attn/extra/w'" in run(save_like_big_vision(tmp_path / "extra.npz", extra))
    wrong = dict(tree, **{"llm/final_norm/scale": np.zeros(7, np.float32)})
    assert "llm/final_norm/scale" in run(save_like_big_vision(tmp_path / "wrong.npz", wrong))
    rank = dict(tree, **{"llm/layers/mlp/gating_einsum": np.zeros((2, 3), np.float32)})  # no transpose fits it
    assert "'llm/layers/mlp/gating_einsum' has shape (2, 3), which does not fit" in run(
        save_like_big_vision(tmp_path / "rank.npz", rank))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert "not an .npz" in run(tmp_path / "junk.npz")
    assert "does not exist" in run(tmp_path / "absent.npz")
    ints = dict(tree, **{"img/head/bias": np.zeros(64, np.int32)})
    assert "is int32: PaliGemma weights are floating point" in run(save_like_big_vision(tmp_path / "ints.npz", ints, dtype=None))
    # A good file whose shapes are not the preset's: one line, nothing written.
    good = save_like_big_vision(tmp_path / "good.npz", tree)
    assert "preset's shapes" in run(good, "--preset", "paligemma-3b-224")
    assert "unknown preset" in run(good, "--preset", "paligemma-9b")
    # Layers given twice (stacked and per layer).
    twice = dict(tree, **{"llm/layers/0/mlp/linear": tree["llm/layers/mlp/linear"][0]})
    with pytest.raises(WeightError, match="twice"):
        bvw.plan(save_like_big_vision(tmp_path / "twice.npz", twice), preset=hf_cfg)
    # The way back: a directory that is not pali-jax's, an existing output.
    assert cli.main(["export-big-vision", str(tmp_path / "nothing"), str(tmp_path / "out.npz")]) == 2
    assert "not a pali-jax directory" in _error(capsys)
    (tmp_path / "taken.npz").write_bytes(b"keep")
    converted = convert_big_vision(good, tmp_path / "converted")
    assert cli.main(["export-big-vision", str(converted), str(tmp_path / "taken.npz")]) == 2
    assert "already exists" in _error(capsys) and (tmp_path / "taken.npz").read_bytes() == b"keep"
    # An existing DST is kept.
    (tmp_path / "exists").mkdir()
    assert cli.main(["convert-big-vision", str(good), str(tmp_path / "exists")]) == 2
    assert "already exists" in _error(capsys)
    # float16 files are read (as float32 by default).
    f16 = save_like_big_vision(tmp_path / "f16.npz", tree, np.float16)
    params = to_host(bvw.plan(f16, preset=hf_cfg))
    assert params["llm"]["layers"]["mlp"]["linear"].dtype == np.float32
    np.testing.assert_array_equal(params["llm"]["layers"]["mlp"]["linear"],
                                  tree["llm/layers/mlp/linear"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_are_refused(models, tmp_path, capsys, value):
    tree = big_vision_tree(models["pg1"]["model"])
    tree["llm/layers/mlp/linear"] = tree["llm/layers/mlp/linear"].copy()
    tree["llm/layers/mlp/linear"][1, 3, 5] = value
    npz = save_like_big_vision(tmp_path / "bad.npz", tree)
    message = "'llm/layers/mlp/linear' holds NaN or infinite values: the checkpoint is damaged"
    assert message in _refused(capsys, npz)
    assert message in _refused_by_from_pretrained(npz)


def _with_member(tree: dict[str, np.ndarray], path: Path, name: str, header_shape: tuple[int, ...]) -> Path:
    """The tree as an .npz whose member `name` holds its real data under a header claiming `header_shape`."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, value in tree.items():
            with zf.open(f"params/{key}.npy", "w") as f:
                value = np.ascontiguousarray(value, np.float32)
                shape = header_shape if key == name else value.shape
                np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
                f.write(value.tobytes())
    return path


def _flip_last_byte(src: Path, dst: Path, entry: str) -> Path:
    """A copy of `src` with the last data byte of `entry` changed (its CRC-32 no longer matches)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo(entry)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size - 1] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def test_damaged_files_are_refused(models, tmp_path, capsys):
    tree = big_vision_tree(models["pg1"]["model"])
    # A header claiming 95 GiB for a member of a few kilobytes: refused before anything is allocated.
    huge = _with_member(tree, tmp_path / "huge.npz", "llm/embedder/input_embedding", (100000000, 256))
    message = "'params/llm/embedder/input_embedding.npy' is damaged: its header says (100000000, 256) float32"
    assert message in _refused(capsys, huge) and message in _refused_by_from_pretrained(huge)
    # One byte flipped in a member's data: the zip's CRC-32 says so.
    good = save_like_big_vision(tmp_path / "good.npz", tree)
    flipped = _flip_last_byte(good, tmp_path / "flipped.npz", "params/llm/layers/mlp/linear.npy")
    message = "member params/llm/layers/mlp/linear.npy is damaged (Bad CRC-32"
    assert message in _refused(capsys, flipped) and message in _refused_by_from_pretrained(flipped)
    # Strings and Python objects are no weights.
    strings = save_like_big_vision(tmp_path / "strings.npz", dict(tree, **{"img/head/bias": np.array(["x"] * 64)}))
    assert "'img/head/bias' is <U1: PaliGemma weights are floating point" in _refused(capsys, strings)
    objects = dict(tree, **{"img/head/bias": np.array([None] * 64, object)})
    np.savez(tmp_path / "objects.npz", **{"params/" + k: v for k, v in objects.items()})
    assert "'img/head/bias' is object: PaliGemma weights are floating point" in _refused(capsys, tmp_path / "objects.npz")


def test_tokenizer_loads_before_anything_is_written(models, tokenizer_dir, tmp_path, capsys):
    npz = save_like_big_vision(tmp_path / "pt.npz", big_vision_tree(models["pg1"]["model"]))
    (tmp_path / "notes.txt").write_text("not a sentencepiece model\n")
    assert "cannot load tokenizer model" in _refused(capsys, npz, "--tokenizer", str(tmp_path / "notes.txt"))
    out = convert_big_vision(npz, tmp_path / "converted", tokenizer=tokenizer_dir / "tokenizer.model")
    assert (out / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    assert PaliGemma.from_pretrained(out).tokenizer.vocab_size == ROWS


def test_host_memory_is_checked_before_allocating(models, tmp_path, monkeypatch):
    npz = save_like_big_vision(tmp_path / "pt.npz", big_vision_tree(models["pg1"]["model"]))
    monkeypatch.setattr("pali_jax.weights.materialise.free_memory", lambda device: (1000, "available host memory"))
    with pytest.raises(WeightError, match="GiB in float32, more than the 0.0 GiB of available host memory: load it"):
        to_host(bvw.plan(npz))


def test_blocks_of_rows_give_the_same_arrays(models, tmp_path, monkeypatch):
    """Members read a few rows at a time (as full-size ones are) give what whole reads give."""
    npz = save_like_big_vision(tmp_path / "pt.npz", big_vision_tree(models["pg1"]["model"]))
    whole = to_host(bvw.plan(npz))
    monkeypatch.setattr("pali_jax.weights.materialise.BLOCK_BYTES", 1000)
    blocks = to_host(bvw.plan(npz))
    for (keys, a), b in zip(jax.tree_util.tree_flatten_with_path(whole)[0], jax.tree.leaves(blocks)):
        np.testing.assert_array_equal(a, b, err_msg=str(keys))


def test_library_does_not_import_convert():
    code = ("import sys, pali_jax.weights, pali_jax.segmentation; "
            "bad = [m for m in sys.modules if m == 'convert' or m.startswith('convert.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
