"""The continuous decoder driven call by call (`continuous.Session`), as the server's engine drives
it: prompts admitted while others decode, answers with their own sampling, cancelled answers, tokens
read as they come. On the bundled demo model (the dataset job's tests are in test_annotate.py)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali_jax import PaliGemma
from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax.continuous import Prompt, Sampling, Session, pad_prompt, slot_shape
from pali_jax.decode import StopReason
from pali_jax.demo import shapes
from pali_jax.generation_config import GenerationConfig
from pali_jax.processor import preprocess_images
from pali_jax.sampling import SamplingParams, sample, sample_rows

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"
SLOTS = 4


@pytest.fixture(scope="module")
def demo() -> PaliGemma:
    return PaliGemma.from_pretrained(DEMO_MODEL, layout=CHECKPOINT_LAYOUT)  # compiles faster


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, str]]:
    out = []
    for i, scene in enumerate(shapes.scenes(8, seed=11)):
        prompts = [p for p, _ in shapes.prompts(scene)]
        out.append((shapes.render(scene), prompts[i % len(prompts)]))
    return out


@pytest.fixture(scope="module")
def session_of(demo):
    shape = slot_shape(demo.config, SLOTS, demo.config.num_image_tokens + 16, 32, 4, logprobs=True)
    return lambda: Session(demo.continuous, demo.params, shape, GenerationConfig())


def prompt(demo, image, text, item, limit=32, **fields) -> Prompt:
    ids, types = demo.tokenizer.encode_example(text, num_image_tokens=demo.config.num_image_tokens)
    pixels = preprocess_images([image], demo.config.image_size)[0].astype(demo.dtype)
    return Prompt(item, pixels, *pad_prompt(demo.config, ids, types), limit, **fields)


def drain(session: Session, answers: dict, progress: dict | None = None, steps: int = 3) -> None:
    """Decode calls of `steps` steps until no slot is live; answers by item."""
    while session.live:
        ended, going = session.decode(steps, 1, progress=progress is not None)
        answers.update({a.item: a for a in ended})
        for p in going:
            progress.setdefault(p.item, []).append(p)


def test_admitted_while_others_decode_with_their_own_sampling(demo, scenes, session_of):
    """Greedy answers next to sampled ones and ones that ignore the stop token, prompts admitted
    between decode calls of a few steps: greedy answers are `generate`'s, log-probabilities its
    scores, a sampled answer is the same whatever it shares the slots with."""
    session = session_of()
    own = Sampling.of(GenerationConfig(temperature=3.0, seed=42))
    todo = deque([prompt(demo, *scenes[0], 0), prompt(demo, *scenes[1], 1, sampling=own),
                  prompt(demo, *scenes[2], 2, ignore_stop_tokens=True, limit=20)])
    answers, progress = {}, {}
    session.admit(todo, 1)
    session.decode(2, 1)  # under way: then more arrive
    waiting = deque(prompt(demo, *scenes[k], k) for k in (3, 4, 5))
    session.admit(waiting, 1)
    assert session.live == SLOTS and [p.item for p in waiting] == [4, 5]  # one fitted, two wait
    while session.live:
        ended, going = session.decode(2, 1, progress=True)
        answers.update({a.item: a for a in ended})
        for p in going:
            progress.setdefault(p.item, []).append(p)
        session.admit(waiting, 1)
    assert sorted(answers) == list(range(6))
    for k in (0, 3, 4, 5):
        [want] = demo.generate(*scenes[k], max_new_tokens=32, output_scores=True)
        assert answers[k].tokens == want.token_ids, k
        np.testing.assert_allclose(answers[k].logprobs, want.logprobs, atol=1e-4)
    assert answers[2].stop_reason == StopReason.MAX_NEW_TOKENS and len(answers[2].tokens) == 20
    for item, seen in progress.items():
        assert all(answers[item].tokens[: len(p.tokens)] == p.tokens for p in seen)  # prefixes as they came
    # Admitted the same way beside other prompts, the sampled answer is the same: its draws are its
    # own. (Prefilled alone, it would go through a one-row refill, another program whose rounding
    # can flip a draw at this temperature.)
    other = session_of()
    other.admit(deque([prompt(demo, *scenes[6], 10), prompt(demo, *scenes[1], 9, sampling=own),
                       prompt(demo, *scenes[7], 11, limit=20)]), 1)
    again = {}
    drain(other, again)
    assert again[9].tokens == answers[1].tokens and again[10].tokens != answers[0].tokens


def test_a_cancelled_answer_frees_its_slot(demo, scenes, session_of):
    """Cancelled mid-answer: its slot is free at once and refilled, the answer is never reported,
    the others are unchanged."""
    session = session_of()
    session.admit(deque(prompt(demo, *scenes[k], k, ignore_stop_tokens=True) for k in range(SLOTS)), 1)
    session.decode(3, 1)
    assert session.cancel(1) and not session.cancel(1) and session.free_rows() == [1]
    session.admit(deque([prompt(demo, *scenes[5], 5)]), 1)
    answers = {}
    drain(session, answers)
    assert sorted(answers) == [0, 2, 3, 5]
    assert all(len(answers[k].tokens) == 32 for k in (0, 2, 3))
    assert answers[5].tokens == demo.generate(*scenes[5], max_new_tokens=32)[0].token_ids
    # cancelled and not refilled: ended at the next decode call, nothing reported
    session.admit(deque([prompt(demo, *scenes[6], 6, ignore_stop_tokens=True)]), 1)
    session.decode(1, 1)
    assert session.cancel(6)
    ended, going = session.decode(3, 1, progress=True)
    assert ended == [] and going == [] and session.live == 0
    assert np.asarray(session.slots.done).all()  # every row ended on the device


def test_sample_rows_with_settings_per_row():
    """Each row draws what `sample` draws for it alone with its own settings; temperature 0 rows
    are greedy."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 3
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    params = SamplingParams(jnp.array([0.0, 1.0, 2.0, 0.5]), jnp.array([0, 5, 0, 0], jnp.int32),
                            jnp.array([1.0, 1.0, 0.5, 0.9]))
    got = sample_rows(logits, keys, params)
    for b in range(4):
        alone = SamplingParams.make(float(params.temperature[b]), int(params.top_k[b]), float(params.top_p[b]))
        assert int(got[b]) == int(sample(logits[b : b + 1], keys[b], alone)[0]), b
    assert int(got[0]) == int(jnp.argmax(logits[0]))
