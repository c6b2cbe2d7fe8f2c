"""Generation against transformers' generate, and the decode loop's own guarantees."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from test_paligemma import make_inputs

from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax.beam_search import BeamSearch
from pali_jax.decode import MIN_TEXT_BUCKET, StopReason, bucket, prepare_prompts
from pali_jax.generate import Generator
from pali_jax.generation_config import GenerationConfig
from pali_jax.pretrained import PaliGemma
from pali_jax.sampling import SamplingParams

NEW_TOKENS = 24
TIE = 1e-4  # HF top-2 logits closer than this may legitimately flip under float32 rounding


def prompt(pg, n_text: int, seed: int):
    """An image + `<bos> text "\\n"` prompt, all prefix (type 0), as a 1-row batch."""
    pixels, ids, _ = make_inputs(pg, 1, n_text, 0, seed=seed)
    return pixels, np.concatenate([ids, [[108]]], axis=1).astype(np.int32)


def hf_greedy(model, pixels, ids, n=NEW_TOKENS):
    """HF greedy tokens and each step's logits."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), input_ids=ids_t,
            token_type_ids=torch.zeros_like(ids_t), attention_mask=torch.ones_like(ids_t),
            max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
    return out.sequences[0, ids.shape[1]:].numpy(), torch.stack(out.logits)[:, 0].numpy()


def agree(ours: np.ndarray, hf_tokens: np.ndarray, hf_logits: np.ndarray) -> str:
    """"equal", or "tie" when the first difference sits on an HF near-tie; fails otherwise."""
    n = len(hf_tokens)
    diff = np.flatnonzero(ours[:n] != hf_tokens)
    if len(diff) == 0:
        assert len(ours) >= n
        return "equal"
    top2 = np.sort(hf_logits[diff[0]])[-2:]
    assert top2[1] - top2[0] < TIE, f"tokens differ at step {diff[0]} with no tie: {ours[:n]} vs {hf_tokens}"
    return "tie"


def test_greedy_matches_transformers(tiny):
    outcomes = []
    for seed, n_text in enumerate((3, 8, 13)):
        pixels, ids = prompt(tiny.pg, n_text, seed)
        ours = tiny.pg.generate_ids(pixels, ids, max_new_tokens=NEW_TOKENS)
        hf_tokens, hf_logits = hf_greedy(tiny.hf, pixels, ids)
        outcomes.append(agree(ours.tokens[0, : ours.lengths[0]], hf_tokens, hf_logits))
    assert outcomes.count("tie") <= 1, outcomes


def test_batch_rows_equal_their_own_runs(tiny):
    rows = [prompt(tiny.pg, n, 20 + n) for n in (2, 7, 13)]
    length = max(ids.shape[1] for _, ids in rows)
    ids = np.concatenate([np.pad(r, ((0, 0), (length - r.shape[1], 0))) for _, r in rows])
    mask = np.concatenate([np.pad(np.ones_like(r), ((0, 0), (length - r.shape[1], 0))) for _, r in rows])
    pixels = np.concatenate([p for p, _ in rows])
    out = tiny.pg.generate_ids(pixels, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    outcomes = [agree(out.tokens[b, : out.lengths[b]], *hf_greedy(tiny.hf, *rows[b])) for b in range(3)]
    assert outcomes.count("tie") <= 1, outcomes


def test_decode_logits_equal_full_forward(tiny):
    pixels, ids = prompt(tiny.pg, 6, 5)
    out = tiny.pg.generator.generate(tiny.pg.params, pixels, ids, max_new_tokens=12, return_logits=True)
    generated = out.tokens[0, : out.lengths[0]]
    full = np.concatenate([ids[0], generated])[None]
    types = np.concatenate([np.zeros(ids.shape[1]), np.ones(len(generated))])[None].astype(np.int32)
    logits = np.asarray(tiny.pg.forward(pixels, full, types))[0]
    # Position t predicts token t + 1: the prompt's last position predicts the first new token.
    predicting = logits[ids.shape[1] - 1 : ids.shape[1] - 1 + len(generated)]
    assert np.abs(predicting - out.logits[0, : len(generated)]).max() <= 1e-4


def test_stacked_and_per_layer_layouts_generate_the_same(tiny_models):
    pg = PaliGemma.from_pretrained(tiny_models["pg2"].hf_dir, layout=CHECKPOINT_LAYOUT)
    split = tiny_models["pg2"].pg  # the default: per-layer weights and cache
    assert not split.layout.stacked
    pixels, ids = prompt(pg, 6, 5)
    want = pg.generator.generate(pg.params, pixels, ids, max_new_tokens=12, return_logits=True)
    got = split.generator.generate(split.params, pixels, ids, max_new_tokens=12, return_logits=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert np.abs(got.logits - want.logits).max() <= 1e-5
    streamed = split.generator.stream(split.params, pixels, ids, max_new_tokens=12)
    np.testing.assert_array_equal(np.stack(list(streamed), axis=1), want.tokens)


@pytest.mark.parametrize("batch", [1, 3])
def test_bfloat16_default_layout_generates_like_the_checkpoint_layout(tiny_models, batch):
    """bf16 on CPU: the default layout holds projections output-first and multiplies by other
    routes (`backend.project`); same tokens, logits within bf16 rounding of the stacked model's."""
    hf_dir = tiny_models["pg1"].hf_dir
    stacked = PaliGemma.from_pretrained(hf_dir, dtype="bfloat16", layout=CHECKPOINT_LAYOUT)
    split = PaliGemma.from_pretrained(hf_dir, dtype="bfloat16")
    assert split.layout.out_first == (jax.default_backend() == "cpu")
    pixels, ids = prompt(stacked, 6, 5)
    pixels, ids = np.repeat(pixels, batch, 0), np.repeat(ids, batch, 0)
    want = stacked.generator.generate(stacked.params, pixels, ids, max_new_tokens=8, return_logits=True)
    got = split.generator.generate(split.params, pixels, ids, max_new_tokens=8, return_logits=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert np.abs(got.logits - want.logits).max() <= 0.02 * np.abs(want.logits).max()


def test_stop_token_inside_a_batch(tiny_models):
    pg = tiny_models["pg1"].pg
    (p0, ids0), (p1, ids1) = prompt(pg, 4, 30), prompt(pg, 4, 31)
    pixels, ids = np.concatenate([p0, p1]), np.concatenate([ids0, ids1])
    free = pg.generate_ids(pixels, ids, max_new_tokens=16).tokens
    stop = next(int(t) for t in free[0, 2:] if t not in free[1])
    at = int(np.flatnonzero(free[0] == stop)[0])
    out = pg.generate_ids(pixels, ids, max_new_tokens=16, stop_tokens=(stop,))
    assert out.lengths.tolist() == [at + 1, 16]
    assert out.stop_reason == [StopReason.STOP_TOKEN, StopReason.MAX_NEW_TOKENS]
    np.testing.assert_array_equal(out.tokens[0, : at + 1], free[0, : at + 1])
    assert (out.tokens[0, at + 1 :] == pg.config.pad_token_id).all()  # a finished row stays finished
    np.testing.assert_array_equal(out.tokens[1], free[1])  # ... while the other goes on unchanged


def test_cache_full_stops_without_overrun(tiny_models):
    pg = tiny_models["pg1"].pg
    pixels, ids = prompt(pg, 4, 7)
    free = pg.generate_ids(pixels, ids, max_new_tokens=20).tokens[0]
    prompt_slots = pg.config.num_image_tokens + MIN_TEXT_BUCKET
    out = pg.generate_ids(pixels, ids, max_new_tokens=20, cache_length=prompt_slots + 5)
    # The prefill's token needs no slot; each further token writes its predecessor: 1 + 5 tokens.
    assert out.lengths.tolist() == [6] and out.stop_reason == [StopReason.CACHE_FULL]
    np.testing.assert_array_equal(out.tokens[0], free[:6])


def test_no_recompile_within_a_bucket(tiny_models):
    pg = tiny_models["pg2"].pg
    gen = Generator(pg.module)
    p_a, ids_a = prompt(pg, 3, 1)
    p_b, ids_b = prompt(pg, 11, 2)  # another length, same 16-token text bucket
    gen.generate(pg.params, p_a, ids_a, max_new_tokens=10)
    assert gen.traces == 1
    gen.generate(pg.params, p_b, ids_b, max_new_tokens=20, temperature=0.7, top_k=5, seed=3)
    gen.generate(pg.params, p_b, ids_b, generation_config=GenerationConfig(max_new_tokens=31, temperature=1.3, top_p=0.9, seed=2**40))
    assert gen.traces == 1 and gen._generate._cache_size() == 1


def test_prompt_buckets():
    assert {bucket(n, MIN_TEXT_BUCKET) for n in range(1, 201)} == {16, 32, 64, 128, 256}
    assert bucket(16, 16) == 16 and bucket(17, 16) == 32


def test_sampling_is_seeded_and_streams(tiny_models):
    pg = tiny_models["pg2"].pg
    pixels, ids = prompt(pg, 5, 9)
    sampled = lambda seed: pg.generate_ids(pixels, ids, max_new_tokens=12, temperature=1.0, top_k=50, seed=seed)  # noqa: E731
    a, b, c = sampled(1), sampled(1), sampled(2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = pg.generate_ids(pixels, ids, max_new_tokens=12)
    t0 = pg.generate_ids(pixels, ids, max_new_tokens=12, temperature=0.0, top_k=50, seed=5)
    np.testing.assert_array_equal(greedy.tokens, t0.tokens)
    streamed = pg.generator.stream(pg.params, pixels, ids, max_new_tokens=12, temperature=1.0, top_k=50, seed=1)
    np.testing.assert_array_equal(np.stack(list(streamed), axis=1), a.tokens)


def test_stream_stops_like_generate(tiny_models):
    pg = tiny_models["pg1"].pg
    pixels, ids = prompt(pg, 4, 30)
    free = pg.generate_ids(pixels, ids, max_new_tokens=10).tokens[0]
    stop = int(free[3])
    full = pg.generate_ids(pixels, ids, max_new_tokens=10, stop_tokens=(stop,))
    streamed = list(pg.generator.stream(pg.params, pixels, ids, max_new_tokens=10, stop_tokens=(stop,)))
    np.testing.assert_array_equal(np.concatenate(streamed), full.tokens[0])


def test_beam_search(tiny_models):
    pg = tiny_models["pg2"].pg
    search = BeamSearch(pg.module)
    pixels, ids = prompt(pg, 6, 11)
    greedy = pg.generate_ids(pixels, ids, max_new_tokens=8)
    one = search.search(pg.params, pixels, ids, beams=1, max_new_tokens=8)
    np.testing.assert_array_equal(one.tokens, greedy.tokens)
    four = search.search(pg.params, pixels, ids, beams=4, max_new_tokens=8)
    assert four.scores[0] >= one.scores[0] - 1e-6
    # The reported score is the hypothesis' own mean log-probability under a full forward pass.
    seq = four.tokens[0, : four.lengths[0]]
    full = np.concatenate([ids[0], seq])[None]
    types = np.concatenate([np.zeros(ids.shape[1]), np.ones(len(seq))])[None].astype(np.int32)
    logp = jax.nn.log_softmax(np.asarray(pg.forward(pixels, full, types))[0], axis=-1)
    start = ids.shape[1] - 1
    total = sum(float(logp[start + i, t]) for i, t in enumerate(seq))
    assert four.scores[0] == pytest.approx(total / len(seq), abs=1e-4)


def _temporary_bytes(hf_dir, dtype: str, stacked: bool, batch: int) -> tuple[int, int]:
    """(scratch memory of the compiled generate program, weights and inputs excluded; the
    weights' bytes in float32)."""
    pg = PaliGemma.from_pretrained(hf_dir, dtype=dtype, layout=CHECKPOINT_LAYOUT if stacked else None)
    pixels, ids = prompt(pg, 5, 3)
    pixels, ids = np.repeat(pixels, batch, 0), np.repeat(ids, batch, 0)
    statics, ids, types, mask, stops = prepare_prompts(pg.config, ids, None, None, GenerationConfig(max_new_tokens=8))
    compiled = pg.generator._generate.lower(
        statics, pg.params, pixels, ids, types, mask, 8, SamplingParams.greedy(), jax.random.PRNGKey(0), stops
    ).compile()
    return compiled.memory_analysis().temp_size_in_bytes, sum(4 * x.size for x in jax.tree.leaves(pg.params))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stacked", [True, False])
def test_bfloat16_generation_holds_no_float32_weights(tiny_models, batch, stacked):
    """XLA:CPU computes bf16 ops in float32 (see `backend.compiler_options`). A program that
    converted the weights wholesale (out of the decode loop) would hold a float32 copy of them and
    need at least their float32 bytes of scratch; converted per use, bf16 needs about what float32
    needs (the per-layer cache adds float32 copies of each layer's keys and values: +40% here)."""
    hf_dir = tiny_models["pg1"].hf_dir
    bf16, f32_weights = _temporary_bytes(hf_dir, "bfloat16", stacked, batch)
    f32, _ = _temporary_bytes(hf_dir, "float32", stacked, batch)
    assert bf16 < f32_weights / 2 and bf16 <= 1.5 * f32


def test_bad_generate_arguments(tiny_models):
    pg = tiny_models["pg1"].pg
    pixels, ids = prompt(pg, 3, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pg.generate_ids(pixels, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        pg.generate_ids(pixels, ids, temperature=-1)
    with pytest.raises(ValueError, match="left-padded"):
        pg.generate_ids(pixels, ids, attention_mask=np.pad(np.ones_like(ids[:, 1:]), ((0, 0), (0, 1))))


def test_compilation_cache_is_created_private(tmp_path):
    from pali_jax.generate import enable_compilation_cache

    path = enable_compilation_cache(tmp_path / "new" / "cache")
    assert path.stat().st_mode & 0o777 == 0o700
