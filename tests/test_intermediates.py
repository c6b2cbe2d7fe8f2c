"""Attentions and hidden states of a forward pass against transformers' (eager, the same flags).

The tiny models' large norm scales amplify float32 rounding: where transformers' own float32 result
misses a bound against its float64 run, ours is held to the float64 run and must be no farther
from it than transformers' float32 is (the project's ground-truth rule).
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax.errors import UserError
from pali_jax.intermediates import ForwardOutput
from pali_jax.pretrained import PaliGemma

REL, ABS_PROBS, ABS_HIDDEN = 1e-5, 1e-5, 1e-4


def _errors(ours, ref) -> tuple[float, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)), float(np.abs(ours - ref).max())


def assert_matches(ours, ref32, ref64, max_abs: float, what: str) -> None:
    """ours within (REL, max_abs) of transformers' float32, or else no farther from its float64 run
    than its float32 is (each measure on its own)."""
    rel32, abs32 = _errors(ours, ref32)
    if rel32 <= REL and abs32 <= max_abs:
        return
    (rel64, abs64), (ref_rel, ref_abs) = _errors(ours, ref64), _errors(ref32, ref64)
    assert rel64 <= max(REL, ref_rel) and abs64 <= max(max_abs, ref_abs), (
        f"{what}: against float32 rel {rel32:.1e} abs {abs32:.1e}; against float64 rel {rel64:.1e} abs {abs64:.1e}, "
        f"transformers' float32 rel {ref_rel:.1e} abs {ref_abs:.1e}"
    )


def _inputs(pg: PaliGemma, seed: int = 0):
    """Two rows, the first left-padded by 2, each: image tokens, bos, 4 prompt tokens, 3 suffix tokens."""
    cfg = pg.config
    rng = np.random.default_rng(seed)
    p, length = cfg.num_image_tokens, cfg.num_image_tokens + 8
    ids = rng.integers(3, cfg.image_token_id, (2, length)).astype(np.int32)
    types = np.zeros_like(ids)
    types[:, -3:] = 1
    mask = np.ones_like(ids)
    for row, pad in enumerate((2, 0)):
        ids[row, :pad], mask[row, :pad] = cfg.pad_token_id, 0
        ids[row, pad : pad + p], ids[row, pad + p] = cfg.image_token_id, 2
    pixels = rng.uniform(-1, 1, (2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return pixels, ids, types, mask


def _hf(model, pixels, ids, types, mask, vision: bool = False):
    pixel_values = torch.tensor(pixels, dtype=next(model.parameters()).dtype).permute(0, 3, 1, 2)
    with torch.no_grad():
        if vision:
            return model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
        return model(pixel_values=pixel_values, input_ids=torch.tensor(ids, dtype=torch.long),
                     token_type_ids=torch.tensor(types, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long), output_attentions=True,
                     output_hidden_states=True)


@pytest.fixture(scope="module")
def references(tiny_models):
    """{kind: (inputs, transformers float32 output, float64 output, vision float32, vision float64)}."""
    out = {}
    for kind, tiny in tiny_models.items():
        inputs = _inputs(tiny.pg)
        hf64 = copy.deepcopy(tiny.hf).double()
        out[kind] = (inputs, _hf(tiny.hf, *inputs), _hf(hf64, *inputs), _hf(tiny.hf, *inputs, vision=True),
                     _hf(hf64, *inputs, vision=True))
    return out


def test_decoder_attentions_and_hidden_states(tiny, references):
    (pixels, ids, types, mask), ref32, ref64, _, _ = references[tiny.kind]
    out = tiny.pg.forward(pixels, ids, types, mask, output_attentions=True, output_hidden_states=True)
    assert isinstance(out, ForwardOutput)
    depth = tiny.pg.config.text.depth
    assert len(out.attentions) == depth and len(out.hidden_states) == depth + 1
    real = mask.astype(bool)  # [B, T]: padding queries see nothing; their rows are not compared
    for layer in range(depth):
        ours = np.asarray(out.attentions[layer])
        assert ours.shape == (2, tiny.pg.config.text.num_heads, ids.shape[1], ids.shape[1])
        rows = lambda a: np.moveaxis(np.asarray(a), 1, 2)[real]  # noqa: E731  [real queries, N, S]
        assert_matches(rows(ours), rows(ref32.attentions[layer]), rows(ref64.attentions[layer]), ABS_PROBS,
                       f"attention of layer {layer}")
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)
        assert (ours[0, :, :, :2] == 0).all()  # padded keys get no attention at all
    for i in range(depth + 1):
        assert_matches(np.asarray(out.hidden_states[i])[real], ref32.hidden_states[i].numpy()[real],
                       ref64.hidden_states[i].numpy()[real], ABS_HIDDEN, f"hidden state {i}")
    assert_matches(np.asarray(out.logits)[real], ref32.logits.numpy()[real], ref64.logits.numpy()[real], ABS_HIDDEN,
                   "logits")


def test_vision_attentions_hidden_states_and_image_features(tiny, references):
    (pixels, ids, types, mask), ref32, ref64, vis32, vis64 = references[tiny.kind]
    out = tiny.pg.forward(pixels, ids, types, mask, output_attentions=True, output_hidden_states=True)
    depth = tiny.pg.config.vision.depth
    assert len(out.vision_attentions) == depth and len(out.vision_hidden_states) == depth + 1
    for layer in range(depth):
        assert_matches(out.vision_attentions[layer], vis32.attentions[layer], vis64.attentions[layer], ABS_PROBS,
                       f"vision attention {layer}")
    for i in range(depth + 1):
        assert_matches(out.vision_hidden_states[i], vis32.hidden_states[i], vis64.hidden_states[i], ABS_HIDDEN,
                       f"vision hidden state {i}")
    features = ref32.image_outputs.pooler_output  # the projector's output in transformers 5
    assert_matches(out.image_features, features, ref64.image_outputs.pooler_output, ABS_HIDDEN, "image features")


def test_flags_select_what_is_returned_and_off_is_the_plain_logits(tiny_models):
    pg = tiny_models["pg2"].pg
    pixels, ids, types, mask = _inputs(pg)
    plain = pg.forward(pixels, ids, types, mask)
    assert isinstance(plain, jax.Array)
    only_attn = pg.forward(pixels, ids, types, mask, output_attentions=True)
    only_hidden = pg.forward(pixels, ids, types, mask, output_hidden_states=True)
    assert only_attn.hidden_states is None and only_attn.vision_hidden_states is None
    assert only_hidden.attentions is None and only_hidden.vision_attentions is None
    assert only_attn.image_features is not None and only_hidden.image_features is not None
    # Recording takes the full-matrix attention path: the same logits to rounding.
    np.testing.assert_allclose(only_attn.logits, plain, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(only_attn.logits, only_hidden.logits)


def test_stacked_layout_records_the_same(tiny_models):
    tiny = tiny_models["pg1"]
    stacked = PaliGemma.from_pretrained(tiny.hf_dir, layout=CHECKPOINT_LAYOUT)
    inputs = _inputs(tiny.pg)
    a = tiny.pg.forward(*inputs, output_attentions=True, output_hidden_states=True)
    b = stacked.forward(*inputs, output_attentions=True, output_hidden_states=True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_flags_must_be_bools(tiny_models, flag):
    pg = tiny_models["pg1"].pg
    with pytest.raises(UserError, match=f"{flag} must be a bool"):
        pg.forward(*_inputs(pg), **{flag: "yes"})
