"""Forward parity with transformers' PaliGemmaForConditionalGeneration (float32, eager attention)."""

from __future__ import annotations

import copy
import dataclasses
import json

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import PaliGemmaConfig as HFPaliGemmaConfig

from parity import assert_parity

from pali_jax import config as cfglib
from pali_jax.backend import CHECKPOINT_LAYOUT, Layout
from pali_jax.paligemma import abstract_params
from pali_jax.pretrained import PaliGemma
from pali_jax.train import suffix_nll


def make_inputs(pg: PaliGemma, batch: int, n_prefix: int, n_suffix: int, seed: int = 0):
    """Random pixels and a PaliGemma layout: image tokens, bos, prefix text (type 0), suffix (type 1)."""
    rng = np.random.default_rng(seed)
    cfg = pg.config
    size = cfg.image_size
    pixels = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    text = rng.integers(3, hf_models.IMAGE_TOKEN_ID, (batch, n_prefix + n_suffix))
    ids = np.concatenate([np.full((batch, cfg.num_image_tokens), cfg.image_token_id), np.full((batch, 1), 2), text], 1)
    types = np.concatenate([np.zeros((batch, cfg.num_image_tokens + 1 + n_prefix)), np.ones((batch, n_suffix))], 1)
    return pixels, ids.astype(np.int32), types.astype(np.int32)


def hf_forward(model, pixels, ids, types, mask=None, labels=None):
    mask = np.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
            input_ids=torch.tensor(ids, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            labels=None if labels is None else torch.tensor(labels, dtype=torch.long),
        )


def test_vision_tower_and_projector(tiny):
    pixels, _, _ = make_inputs(tiny.pg, 2, 1, 0)
    encode = lambda m, x: m.img.encode(x)  # noqa: E731
    ours_tower = tiny.pg.module.apply({"params": tiny.pg.params}, pixels, method=encode)
    ours_proj = tiny.pg.module.apply({"params": tiny.pg.params}, pixels, method=lambda m, x: m.embed_image(x))
    with torch.no_grad():
        out = tiny.hf.model.get_image_features(torch.tensor(pixels).permute(0, 3, 1, 2))
    assert_parity(ours_tower, out.last_hidden_state.numpy())
    assert_parity(ours_proj, out.pooler_output.numpy())


def test_logits_prefix_suffix(tiny):
    # 16 image tokens + bos + 5 prefix + 9 suffix: longer than PG2's sliding windows (6 and 8), so
    # suffix tokens on sliding layers lose sight of the image while the prefix block keeps it.
    pixels, ids, types = make_inputs(tiny.pg, 2, 5, 9, seed=1)
    ours = tiny.pg.forward(pixels, ids, types)
    ref = hf_forward(tiny.hf, pixels, ids, types).logits.numpy()
    assert_parity(ours, ref)
    assert (np.asarray(ours).argmax(-1) == ref.argmax(-1)).all()


def test_token_types_default_to_prefix(tiny):
    pixels, ids, _ = make_inputs(tiny.pg, 1, 6, 0, seed=2)
    ref = hf_forward(tiny.hf, pixels, ids, np.zeros_like(ids)).logits.numpy()
    assert_parity(tiny.pg.forward(pixels, ids), ref)


def test_left_padded_batch_equals_unpadded_rows(tiny):
    rows = [make_inputs(tiny.pg, 1, n, 3, seed=10 + n) for n in (1, 4, 8)]
    length = max(r[1].shape[1] for r in rows)
    pad = lambda a, n: np.pad(a, ((0, 0), (n, 0)))  # noqa: E731
    ids = np.concatenate([pad(r[1], length - r[1].shape[1]) for r in rows])
    types = np.concatenate([pad(r[2], length - r[2].shape[1]) for r in rows])
    mask = np.concatenate([pad(np.ones_like(r[1]), length - r[1].shape[1]) for r in rows])
    pixels = np.concatenate([r[0] for r in rows])
    batched = np.asarray(tiny.pg.forward(pixels, ids, types, mask))
    for b, (pix, row_ids, row_types) in enumerate(rows):
        ref = hf_forward(tiny.hf, pix, row_ids, row_types).logits.numpy()[0]
        assert_parity(batched[b, length - row_ids.shape[1]:], ref)


def test_suffix_loss(tiny):
    pixels, ids, types = make_inputs(tiny.pg, 2, 4, 6, seed=3)
    labels = np.where(types == 1, ids, -100)
    ref = float(hf_forward(tiny.hf, pixels, ids, types, labels=labels).loss)
    logits = tiny.pg.forward(pixels, ids, types)
    ours = float(suffix_nll(logits, jnp.asarray(ids), jnp.asarray(types == 1), reduction="token"))
    assert abs(ours - ref) / abs(ref) <= 1e-5
    # Equal suffix lengths: big_vision's per-example reduction gives the same number.
    assert float(suffix_nll(logits, jnp.asarray(ids), jnp.asarray(types == 1))) == pytest.approx(ours, rel=1e-6)


@pytest.mark.parametrize("layout", [Layout(True, False), Layout(True, True), Layout(False, False), Layout(False, True)])
def test_every_layout_gives_the_same_logits(tiny, layout):
    """Stacked or per-layer decoder weights, input or output axes first: the same model."""
    other = PaliGemma.from_pretrained(tiny.hf_dir, layout=layout)
    depth = tiny.pg.config.text.depth
    llm = other.params["llm"]
    assert ("layers" in llm) == layout.stacked and (f"layers_{depth - 1}" in llm) == (not layout.stacked)
    d, n, h = tiny.pg.config.text.width, tiny.pg.config.text.num_heads, tiny.pg.config.text.head_dim
    q = llm["layers"]["attn"]["q_einsum"][0] if layout.stacked else llm["layers_0"]["attn"]["q_einsum"]
    assert q.shape == ((n, h, d) if layout.out_first else (d, n, h))
    pixels, ids, types = make_inputs(tiny.pg, 2, 5, 9, seed=1)
    assert_parity(other.forward(pixels, ids, types), tiny.pg.forward(pixels, ids, types), rel=1e-6, max_abs=1e-5)


def test_a_per_layer_load_is_moved_into_the_layout_one_layer_at_a_time(tiny_models, monkeypatch):
    """weights.load(per_layer=True) holds each decoder layer apart; to_layout drops each layer's
    host array once it is moved, so a big model never holds a weight beside its moved copy."""
    import weakref

    from pali_jax import paligemma, weights

    hf_dir = tiny_models["pg2"].hf_dir
    config, params = weights.load(hf_dir, "float32", per_layer=True)
    depth = config.text.depth
    assert "layers" not in params["llm"] and sorted(k for k in params["llm"] if k.startswith("layers_")) == [
        f"layers_{i}" for i in range(depth)]
    _, stacked = weights.load(hf_dir, "float32")
    for i in range(depth):  # the same values as the stacked load's layer i
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a, b[i]), params["llm"][f"layers_{i}"],
                     stacked["llm"]["layers"])
    assert all(x.ctypes.data % 64 == 0 for x in jax.tree.leaves(params))  # adopted by XLA:CPU uncopied
    sources = [weakref.ref(params["llm"][f"layers_{i}"]["attn"]["q_einsum"]) for i in range(depth)]
    alive, transpose = [], paligemma._transpose

    def recording(w, perm):
        if any(w is r() for r in sources):
            alive.append([i for i, r in enumerate(sources) if r() is not None])
        return transpose(w, perm)

    monkeypatch.setattr(paligemma, "_transpose", recording)
    moved = paligemma.to_layout(params, Layout(stacked=False), Layout(stacked=False, out_first=True))
    # layer i is moved while layers < i - 1 are freed (jit holds on to its latest call's argument)
    assert len(alive) == depth and all(min(layers) >= i - 1 for i, layers in enumerate(alive)), alive
    want = paligemma.to_layout(stacked, CHECKPOINT_LAYOUT, Layout(stacked=False, out_first=True))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), moved, want)


def test_default_layout_is_the_backends_choice(tiny):
    assert tiny.pg.layout == tiny.pg.policy.inference_layout(tiny.pg.dtype)
    back = tiny.pg.checkpoint_params()
    want = PaliGemma.from_pretrained(tiny.hf_dir, layout=CHECKPOINT_LAYOUT).params
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), back, want))


def test_bfloat16_as_close_as_transformers_bfloat16(tiny):
    """bf16 logits: our error against the float32 reference is within 2x of transformers' own bf16 error."""
    pixels, ids, types = make_inputs(tiny.pg, 2, 5, 4, seed=6)
    ref = hf_forward(tiny.hf, pixels, ids, types).logits.numpy()
    hf16 = copy.deepcopy(tiny.hf).to(torch.bfloat16)
    with torch.no_grad():
        theirs = hf16(
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2).to(torch.bfloat16),
            input_ids=torch.tensor(ids, dtype=torch.long), token_type_ids=torch.tensor(types, dtype=torch.long),
        ).logits.float().numpy()
    ours = np.asarray(PaliGemma.from_pretrained(tiny.hf_dir, dtype="bfloat16").forward(pixels, ids, types))
    error = lambda x: np.linalg.norm(x - ref) / np.linalg.norm(ref)  # noqa: E731
    assert 0 < error(ours) <= 2 * error(theirs), (error(ours), error(theirs))


def test_sliding_window_off_is_full_attention(tiny_models):
    tiny = tiny_models["pg2"]
    pixels, ids, types = make_inputs(tiny.pg, 1, 5, 9, seed=4)
    no_window = dataclasses.replace(tiny.pg, config=tiny.pg.config.without_sliding_window())
    wide_cfg = hf_models.tiny_config("pg2")
    wide_cfg.text_config.sliding_window = 4096  # wider than the sequence: plain full attention
    wide = hf_models.PaliGemmaForConditionalGeneration(wide_cfg).eval()
    wide.load_state_dict(tiny.hf.state_dict())
    wide.set_attn_implementation("eager")
    ours = np.asarray(no_window.forward(pixels, ids, types))
    assert_parity(ours, hf_forward(wide, pixels, ids, types).logits.numpy())
    # ... and it differs from HF's windowed default on this sequence, so the switch does something.
    assert np.abs(ours - np.asarray(tiny.pg.forward(pixels, ids, types))).max() > 1e-2


def test_bad_forward_inputs(tiny_models):
    pg = tiny_models["pg1"].pg
    pixels, ids, types = make_inputs(pg, 1, 3, 0)
    with pytest.raises(ValueError, match="pixel_values must be"):
        pg.forward(pixels[:, :8], ids)
    with pytest.raises(ValueError, match="<image> tokens"):
        pg.forward(pixels, ids[:, 2:])


# -- configs ------------------------------------------------------------------------------------
# config.json as the hub ships them (written by transformers 4.4x: default-valued fields absent).
PG1_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1,
                    "torch_dtype": "float32", "vocab_size": 257216},
    "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
    "vocab_size": 257152,
}
PG2_28B_448 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 4608,
    "text_config": {"cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0,
                    "head_dim": 128, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 4608,
                    "intermediate_size": 36864, "model_type": "gemma2", "num_attention_heads": 32,
                    "num_hidden_layers": 46, "num_image_tokens": 1024, "num_key_value_heads": 16,
                    "query_pre_attn_scalar": 144, "sliding_window": 4096, "torch_dtype": "bfloat16",
                    "vocab_size": 257216},
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 448, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "num_image_tokens": 1024, "num_positions": 1024, "patch_size": 14, "projection_dim": 4608,
                      "torch_dtype": "bfloat16", "vision_use_head": False},
}


@pytest.mark.parametrize("raw, preset", [(PG1_224, "paligemma-3b-224"), (PG2_28B_448, "paligemma2-28b-448")])
def test_minimal_hub_configs(tmp_path, raw, preset):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = cfglib.PaliGemmaConfig.from_hf(tmp_path)
    expected = cfglib.preset(preset)
    if ours.eos_token_ids != expected.eos_token_ids:  # the 28B config also stops on <end_of_turn>
        ours = dataclasses.replace(ours, eos_token_ids=expected.eos_token_ids)
    assert ours == expected
    # Cross-check the defaults we filled in against transformers' own reading of the same file.
    hf = HFPaliGemmaConfig.from_dict(raw)
    t, v = hf.text_config, hf.vision_config
    assert (ours.text.width, ours.text.depth, ours.text.head_dim, ours.text.num_kv_heads, ours.text.vocab_size) == (
        t.hidden_size, t.num_hidden_layers, t.head_dim, t.num_key_value_heads, t.vocab_size)
    assert (ours.vision.width, ours.vision.image_size, ours.vision.mlp_dim, ours.vision.layer_norm_eps) == (
        v.hidden_size, v.image_size, v.intermediate_size, v.layer_norm_eps)
    assert ours.text.rope_base == t.rope_parameters["rope_theta"] and ours.text.rms_norm_eps == t.rms_norm_eps


def test_from_hf_matches_saved_tiny_configs(tiny):
    cfg = tiny.pg.config
    hf = tiny.hf.config.text_config
    assert cfg.text.query_pre_attn_scalar == getattr(hf, "query_pre_attn_scalar", hf.head_dim)
    assert cfg.text.layer_is_sliding == tuple(
        lt == "sliding_attention" for lt in getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    )


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "llava"}, "model_type"),
    ({"vision_config": {"vision_use_head": True}}, "vision_use_head"),
    ({"text_config": {"model_type": "llama"}}, "not supported"),
])
def test_bad_configs(bad, message):
    with pytest.raises(cfglib.ConfigError, match=message):
        cfglib.PaliGemmaConfig.from_hf({**PG1_224, **bad})


# Total parameters of the HF checkpoints (vocab 257216), from the facts table.
PARAM_COUNTS = {
    "paligemma-3b": 2_923_466_480, "paligemma2-3b": 3_032_242_416,
    "paligemma2-10b": 9_662_638_832, "paligemma2-28b": 27_650_487_024,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_preset_parameter_counts(name):
    count = sum(x.size for x in jax.tree.leaves(abstract_params(cfglib.preset(f"{name}-224"))))
    assert count == PARAM_COUNTS[name]
    # Higher resolutions only grow the position embedding: (num_patches - 256) * 1152 more.
    count_896 = sum(x.size for x in jax.tree.leaves(abstract_params(cfglib.preset(f"{name}-896"))))
    assert count_896 - count == (4096 - 256) * 1152
