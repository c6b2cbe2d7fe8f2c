"""Attentions and hidden states of a forward pass against transformers' (eager, the same flags),
under the project's parity rule (tests/parity.py)."""

from __future__ import annotations

import copy
import functools

import jax
import numpy as np
import pytest
import torch

from parity import assert_parity
from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax.errors import UserError
from pali_jax.decode import MIN_TEXT_BUCKET, prepare_prompts
from pali_jax.generate import Generator
from pali_jax.generation_config import GenerationConfig
from pali_jax.intermediates import ForwardOutput
from pali_jax.pretrained import PaliGemma
from pali_jax.processor import load_image

ABS_PROBS, ABS_HIDDEN = 1e-5, 1e-4  # attention probabilities; hidden states, logits, log-probabilities


def _inputs(pg: PaliGemma, seed: int = 0, rows: int = 2):
    """`rows` rows, every other one left-padded by 2, each: image tokens, bos, 4 prompt tokens, 3
    suffix tokens."""
    cfg = pg.config
    rng = np.random.default_rng(seed)
    p, length = cfg.num_image_tokens, cfg.num_image_tokens + 8
    ids = rng.integers(3, cfg.image_token_id, (rows, length)).astype(np.int32)
    types = np.zeros_like(ids)
    types[:, -3:] = 1
    mask = np.ones_like(ids)
    for row in range(rows):
        pad = 2 if row % 2 == 0 else 0
        ids[row, :pad], mask[row, :pad] = cfg.pad_token_id, 0
        ids[row, pad : pad + p], ids[row, pad + p] = cfg.image_token_id, 2
    pixels = rng.uniform(-1, 1, (rows, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
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
        assert_parity(rows(ours), rows(ref32.attentions[layer]), rows(ref64.attentions[layer]), max_abs=ABS_PROBS, what=f"attention of layer {layer}")
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)
        assert (ours[0, :, :, :2] == 0).all()  # padded keys get no attention at all
    for i in range(depth + 1):
        assert_parity(np.asarray(out.hidden_states[i])[real], ref32.hidden_states[i].numpy()[real],
                       ref64.hidden_states[i].numpy()[real], max_abs=ABS_HIDDEN, what=f"hidden state {i}")
    assert_parity(np.asarray(out.logits)[real], ref32.logits.numpy()[real], ref64.logits.numpy()[real], max_abs=ABS_HIDDEN, what="logits")


def test_vision_attentions_hidden_states_and_image_features(tiny, references):
    (pixels, ids, types, mask), ref32, ref64, vis32, vis64 = references[tiny.kind]
    out = tiny.pg.forward(pixels, ids, types, mask, output_attentions=True, output_hidden_states=True)
    depth = tiny.pg.config.vision.depth
    assert len(out.vision_attentions) == depth and len(out.vision_hidden_states) == depth + 1
    for layer in range(depth):
        assert_parity(out.vision_attentions[layer], vis32.attentions[layer], vis64.attentions[layer], max_abs=ABS_PROBS, what=f"vision attention {layer}")
    for i in range(depth + 1):
        assert_parity(out.vision_hidden_states[i], vis32.hidden_states[i], vis64.hidden_states[i], max_abs=ABS_HIDDEN, what=f"vision hidden state {i}")
    features = ref32.image_outputs.pooler_output  # the projector's output in transformers 5
    assert_parity(out.image_features, features, ref64.image_outputs.pooler_output, max_abs=ABS_HIDDEN, what="image features")


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


def _analysis_bytes(pg, *args) -> int:
    """XLA's own count for the recorded forward of `args`: arguments + outputs + temporaries, less the params."""
    stats = pg._forward_recorded.lower(pg.params, *args, True, False).compile().memory_analysis()
    params = sum(x.nbytes for x in jax.tree.leaves(pg.params))
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - params


def test_recording_more_than_memory_holds_is_refused_before_it_runs(tiny_models, monkeypatch):
    from pali_jax import generation_config

    pg = tiny_models["pg1"].pg
    pixels, ids, types, mask = _inputs(pg)
    need = _analysis_bytes(pg, pixels, ids, types, mask)
    # What the check measures is all XLA allocates, which the recorded outputs alone understate.
    outputs = 4 * 2 * ids.shape[1] ** 2 * pg.config.text.depth * pg.config.text.num_heads
    assert need > outputs
    monkeypatch.setattr(generation_config, "free_memory", lambda device=None: (need - 1, "available host memory"))
    with pytest.raises(UserError, match=r"^forward needs .* for the forward pass \(2 rows of 24 tokens: its outputs, "
                                        r"recorded intermediates and XLA's temporaries\), more than .* fewer rows") as e:
        pg.forward(pixels, ids, types, mask, output_attentions=True)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(generation_config, "free_memory", lambda device=None: (need, "available host memory"))
    assert isinstance(pg.forward(pixels, ids, types, mask, output_attentions=True), ForwardOutput)


def test_the_plain_forward_is_checked_too(tiny_models, monkeypatch):
    from pali_jax import generation_config

    pg = tiny_models["pg1"].pg
    monkeypatch.setattr(generation_config, "free_memory", lambda device=None: (1000, "available host memory"))
    with pytest.raises(UserError, match=r"^forward needs .* \(2 rows of 24 tokens: its outputs and XLA's temporaries"):
        pg.forward(*_inputs(pg))


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_flags_must_be_bools(tiny_models, flag):
    pg = tiny_models["pg1"].pg
    with pytest.raises(UserError, match=f"{flag} must be a bool"):
        pg.forward(*_inputs(pg), **{flag: "yes"})


# ---- generation ---------------------------------------------------------------------------------

STEPS = 8


def _hf_generate(model, pixels, ids, types, mask):
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model.generate(
            pixel_values=torch.tensor(pixels, dtype=dtype).permute(0, 3, 1, 2), input_ids=torch.tensor(ids),
            token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask), max_new_tokens=STEPS,
            do_sample=False, output_attentions=True, output_scores=True, return_dict_in_generate=True,
        )


def _prompt_inputs(pg, rows: int = 2):
    """The forward inputs without their suffix: left-padded prompts, all prefix."""
    pixels, ids, types, mask = _inputs(pg, seed=4, rows=rows)
    return pixels, ids[:, :-3], np.zeros_like(ids[:, :-3]), mask[:, :-3]


GENERATION_ROWS = 8


def test_generation_attentions_and_scores_match_transformers(tiny):
    pixels, ids, types, mask = _prompt_inputs(tiny.pg, rows=GENERATION_ROWS)
    out = tiny.pg.generate_ids(pixels, ids, types, mask, max_new_tokens=STEPS, output_attentions=True,
                               output_scores=True)
    ref32 = _hf_generate(tiny.hf, pixels, ids, types, mask)
    ref64 = _hf_generate(copy.deepcopy(tiny.hf).double(), pixels, ids, types, mask)
    length = ids.shape[1]
    np.testing.assert_array_equal(out.tokens, ref32.sequences[:, length:].numpy())
    cfg = tiny.pg.config.text
    prompt = out.prefill_attentions.shape[3]  # T, the prompts' bucket
    extra = prompt - length  # the bucket's own left padding, before the prompts' padding
    assert out.attentions.shape == (GENERATION_ROWS, STEPS, cfg.depth, cfg.num_heads, out.attentions.shape[-1])
    np.testing.assert_array_equal(out.prompt_start, extra + np.argmax(mask, axis=1))
    # The passes that produced a row's tokens, its stop token included: transformers goes on
    # running a finished row on padding, which is nobody's answer.
    live = np.arange(STEPS) < out.lengths[:, None]  # [B, STEPS]
    assert live[:, 0].all() and live.sum() > live.size // 2
    for layer in range(cfg.depth):
        # Layer by layer over every row and step together: which of two float32 runs (ours,
        # transformers') lands nearer float64 flips with the input on these amplifying models
        # (pg1, layer 1, 9 prompt pairs: ours nearer in rel L2 on 4, max abs on 5, from 0.5x to
        # 1.7x transformers' error), the max abs most, being one extreme value of a few thousand.
        steps = {"ours": [], "f32": [], "f64": []}
        for step in range(STEPS):
            end = prompt + step  # the slot after the newest token this pass reads
            alive = live[:, step]
            ref = ref32.attentions[step][layer][:, :, -1].numpy()[alive]  # [B', N, keys]
            keys = ref.shape[-1]  # all positions, or the last `window` on a sliding layer
            ours = out.attentions[alive, step, layer]
            assert (ours[..., : end - keys] == 0).all() and (ours[..., end:] == 0).all()
            steps["ours"].append(ours[..., end - keys : end].ravel())
            steps["f32"].append(ref.ravel())
            steps["f64"].append(ref64.attentions[step][layer][:, :, -1].numpy()[alive].ravel())
        assert_parity(*(np.concatenate(steps[k]) for k in ("ours", "f32", "f64")), max_abs=ABS_PROBS, what=f"layer {layer}")
    real = mask.astype(bool)
    for layer in range(cfg.depth):  # the prefill's, over its real queries
        rows = lambda a: np.moveaxis(np.asarray(a), 1, 2)[real]  # noqa: E731
        ours = out.prefill_attentions[:, layer, :, extra:, extra:prompt]
        assert_parity(rows(ours), rows(ref32.attentions[0][layer]), rows(ref64.attentions[0][layer]), max_abs=ABS_PROBS, what=f"prefill layer {layer}")
    chosen = [np.take_along_axis(torch.stack(r.scores, 1).log_softmax(-1).numpy(), out.tokens[..., None], axis=2)
              for r in (ref32, ref64)]  # the scores of greedy decoding are the raw logits
    assert_parity(out.logprobs[live], chosen[0][..., 0][live], chosen[1][..., 0][live], max_abs=ABS_HIDDEN, what="log-probabilities")


def test_flags_off_keep_the_plain_program(tiny_models):
    pg = tiny_models["pg1"].pg
    gen = Generator(pg.module)
    pixels, ids, types, mask = _prompt_inputs(pg)
    plain = gen.generate(pg.params, pixels, ids, types, mask, max_new_tokens=STEPS)
    assert gen.traces == 1
    recorded = gen.generate(pg.params, pixels, ids, types, mask, max_new_tokens=STEPS, output_attentions=True,
                            output_scores=True)
    assert gen.traces == 2  # recording is a program of its own ...
    again = gen.generate(pg.params, pixels, ids, types, mask, max_new_tokens=STEPS)
    assert gen.traces == 2  # ... and the plain one is still the one that runs without it
    np.testing.assert_array_equal(plain.tokens, recorded.tokens)
    np.testing.assert_array_equal(plain.tokens, again.tokens)
    assert plain.attentions is None and plain.logprobs is None and plain.prefill_attentions is None
    statics, *padded, stops = prepare_prompts(pg.config, ids, types, mask, GenerationConfig(max_new_tokens=STEPS))
    state = jax.eval_shape(functools.partial(gen._generate_impl, statics), pg.params, pixels, *padded, 1,
                           GenerationConfig().sampling_params(), jax.random.PRNGKey(0), stops)
    assert state.attentions is None and state.prefill_attentions is None and state.logprobs is None


def test_results_carry_each_rows_own_positions(checkpoint):
    pg = PaliGemma.from_pretrained(checkpoint["converted"])
    images = checkpoint["images"]
    prompts = ["caption en", "answer en " + "what is it " * 8]
    text_tokens = [len(pg.tokenizer.encode(p + "\n")) + 1 for p in prompts]  # <bos> included
    assert text_tokens[0] <= MIN_TEXT_BUCKET < text_tokens[1]  # alone, they take two prompt buckets
    results = pg.generate(images, prompts, max_new_tokens=6, output_attentions=True, output_scores=True)
    cfg = pg.config.text
    for image, text, res in zip(images, prompts, results):
        alone = pg.generate(image, text, max_new_tokens=6, output_attentions=True, output_scores=True)[0]
        n = len(res.token_ids)
        prompt_tokens = pg.config.num_image_tokens + len(pg.tokenizer.encode(text + "\n")) + 1
        assert res.attentions.shape == (n, cfg.depth, cfg.num_heads, prompt_tokens + n - 1)
        assert res.prefill_attentions.shape == (cfg.depth, cfg.num_heads, prompt_tokens, prompt_tokens)
        np.testing.assert_allclose(res.attentions.sum(-1), 1.0, atol=1e-5)
        for step in range(n):  # the pass producing token j reads the positions before it only
            assert (res.attentions[step, ..., prompt_tokens + step :] == 0).all()
        np.testing.assert_allclose(res.attentions, alone.attentions, rtol=0, atol=1e-5)
        np.testing.assert_allclose(res.logprobs, alone.logprobs, rtol=0, atol=1e-5)
        assert (res.logprobs <= 0).all()
    # Batches of one row each, joined: every row's slots agree with the one-batch run.
    pixels, enc = pg._encode([load_image(i) for i in images], prompts)
    whole = pg.generate_ids(pixels, enc.input_ids, enc.token_type_ids, enc.attention_mask, max_new_tokens=6,
                            output_attentions=True)
    split = pg.generate_ids(pixels, enc.input_ids, enc.token_type_ids, enc.attention_mask, max_new_tokens=6,
                            output_attentions=True, batch_size=1)
    for row in range(2):
        a, b = whole.prompt_start[row], split.prompt_start[row]
        np.testing.assert_allclose(whole.attentions[row, ..., a:], split.attentions[row, ..., b:], atol=1e-5)


@pytest.mark.parametrize("call", ["stream", "beams", "annotate"])
def test_recording_is_refused_where_it_does_not_exist(tiny_models, call):
    from pali_jax.generation_config import GenerationError

    pg = tiny_models["pg1"].pg
    pixels, ids, types, mask = _prompt_inputs(pg)
    with pytest.raises(GenerationError, match="output_attentions"):
        if call == "stream":
            pg.generator.stream(pg.params, pixels, ids, types, mask, output_attentions=True)
        elif call == "beams":
            GenerationConfig(beams=2, output_attentions=True)
        else:
            from pali_jax.annotate import annotate

            next(annotate(pg, [], "caption en", output_attentions=True))
