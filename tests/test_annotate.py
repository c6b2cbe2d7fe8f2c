"""The dataset job: continuous batching gives one-by-one answers, the results file resumes, bad
input is one line. On the bundled demo model (trained: its answers differ in length by prompt)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pali_jax import PaliGemma
from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax.annotate import Item, JobStats, annotate, annotate_to_file, main
from pali_jax.continuous import _refill_sizes
from pali_jax.demo import shapes
from pali_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"
SLOTS = 4  # one slot count and cache size for every test here: programs compile once per slot shape
SPARE = 4  # spare cache slots: after 32 + 4 steps the cache shifts, then every 4 steps or more
JOB = {"slots": SLOTS, "spare_slots": SPARE}
# Cheap code generation for the subprocess: its programs run on tiny arrays.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def demo() -> PaliGemma:
    """Stacked layers (the checkpoint layout): they compile faster than the per-layer inference
    layout, which benchmarks/annotate.py runs (the CLI subprocess below too)."""
    return PaliGemma.from_pretrained(DEMO_MODEL, layout=CHECKPOINT_LAYOUT)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Item]:
    """20 shapes images, each with one of its prompts in turn (captions, colours, boxes)."""
    folder = tmp_path_factory.mktemp("shapes")
    items = []
    for i, scene in enumerate(shapes.scenes(20, seed=3)):
        path = folder / f"{i:03d}.png"
        PIL.Image.fromarray(shapes.render(scene)).save(path)
        prompts = [p for p, _ in shapes.prompts(scene)]
        items.append(Item(str(path), prompts[i % len(prompts)]))
    return items


def one_by_one(pg, item: Item, max_new_tokens: int) -> list[int]:
    return pg.generate(item.image, item.prompt, max_new_tokens=max_new_tokens)[0].token_ids


def test_answers_equal_one_by_one_greedy(demo, images):
    """Mixed prompts (left padding of several lengths), mixed answer limits, four slots refilled
    over and over, the cache shifted at its end: every answer is the one `generate` gives alone."""
    items = [Item(i.image, i.prompt, 3 if k % 3 == 0 else None) for k, i in enumerate(images)] * 3
    stats = JobStats()
    records = list(annotate(demo, items, **JOB, max_new_tokens=20, stats=stats))
    assert [r["image"] for r in records] == [i.image for i in items]  # input order
    for item, record in zip(items, records):
        assert record["token_ids"] == one_by_one(demo, item, item.max_new_tokens or 20), item
        assert record["text"] == demo.tokenizer.decode(record["token_ids"])
    assert {r["stop_reason"] for r in records} == {"stop_token", "max_new_tokens"}
    assert any(r["boxes"] for r in records) and any(r["prompt"].startswith("detect") for r in records)
    c = stats.decoder
    assert c.decode_steps > 32 + SPARE, "the cache was never shifted: make the run longer"
    # Compiles: init, decode and one refill per size (powers of two up to SLOTS: 4, 2, 1), whatever the refills.
    traces = demo.continuous.traces
    assert c.refills > traces and traces <= 5
    list(annotate(demo, items[::-1], **JOB, max_new_tokens=20))
    assert demo.continuous.traces == traces


def test_refill_sizes_are_powers_of_two():
    assert _refill_sizes(13, least=1) == [8, 4, 1]
    assert _refill_sizes(13, least=6) == [8]  # the other 5 wait for the next refill
    assert _refill_sizes(13, least=5) == [8, 4]
    assert _refill_sizes(32, least=16) == [32] and _refill_sizes(3, least=16) == []


def test_refills_wait_for_free_slots(demo, images):
    """refill_at = every slot: decoding goes on until every answer has ended, and each refill
    fills every slot (one prefill of 4 rows, not 2 + 1 + 1 as answers end); answers unchanged."""
    items = images[:16]
    stats = JobStats()
    records = list(annotate(demo, items, **JOB, refill_at=SLOTS, stats=stats))
    assert stats.decoder.refills == 4
    assert [r["token_ids"] for r in records] == [one_by_one(demo, item, 32) for item in items]


def test_sampling_is_reproducible(demo, images):
    """Each answer draws with its own key (seed, position): a rerun gives the same answers. (Another
    slot arrangement may not: the sampler ranks tokens by sorting, and logits equal to float32
    rounding can swap ranks.)"""
    items = images[:8]
    run = lambda **kw: [r["token_ids"] for r in annotate(demo, items, **JOB, temperature=5.0, **kw)]  # noqa: E731
    first = run(seed=5)
    assert run(seed=5) == first and run(seed=6) != first
    assert first != [r["token_ids"] for r in annotate(demo, items, **JOB)]  # not greedy


def test_beam_search_is_refused_in_one_line(demo, images):
    with pytest.raises(ValueError, match="beam search runs in fixed batches|needs fixed batches"):
        annotate(demo, images[:2], beams=2)


def test_arguments_are_checked_before_anything_runs(demo, images, tmp_path):
    path = images[0].image
    for items, prompt, message in (
        (5, "caption en", "^items must be an image .* or a list of them, got int$"),
        (None, "caption en", "got NoneType$"),
        ([path, 5], "caption en", r"^items\[1\] must be an image path, PIL image, numpy array or Item, got int$"),
        ([Item(path, prompt=b"caption en")], None, r"^items\[0\]: the prompt must be a string, got bytes$"),
        ([path], b"caption en", "^prompt must be a string, got bytes$"),
    ):
        with pytest.raises(UserError, match=message):
            annotate(demo, items, prompt, **JOB)
    with pytest.raises(UserError, match="^items must be an image .* got int$"):
        annotate_to_file(demo, 5, tmp_path / "r.jsonl", "caption en", **JOB)
    assert list(tmp_path.iterdir()) == []
    # A single path is one item, as in PaliGemma.generate (not its characters): here already done.
    stats = JobStats()
    annotate(demo, path, "caption en", **JOB, done={(path, "caption en")}, stats=stats)
    assert stats.already_done == 1


def test_bad_image_is_skipped_with_its_path_or_stops_the_job(demo, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items = [images[0], Item(str(bad), "caption en"), images[1]]
    warnings, stats = [], JobStats()
    records = list(annotate(demo, items, **JOB, warn=warnings.append, stats=stats))
    assert [r["image"] for r in records] == [images[0].image, images[1].image]
    assert stats.skipped == 1 and len(warnings) == 1 and str(bad) in warnings[0]
    with pytest.raises(ValueError, match="broken.png.*--stop-on-error"):
        list(annotate(demo, items, **JOB, stop_on_error=True))


def test_resume_skips_done_items_and_cuts_a_torn_line(demo, images, tmp_path):
    out = tmp_path / "results.jsonl"
    first = annotate_to_file(demo, images[:5], out, **JOB, progress=False)
    assert first.answered == 5
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # killed in mid-write
    warnings = []
    again = annotate_to_file(demo, images[:8], out, **JOB, progress=False, warn=warnings.append)
    assert (again.already_done, again.answered) == (3, 5)
    assert any("torn last line" in w for w in warnings)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [i.image for i in images[:8]]  # rewritten in input order
    assert records[:3] == [json.loads(line) for line in lines[:3]]  # done lines kept as they were


def test_killed_job_resumes_with_every_image_once(demo, images, tmp_path):
    """kill -9 at a random moment once answers are being written; the rerun completes the file."""
    folder = Path(images[0].image).parent
    out, cache = tmp_path / "out.jsonl", tmp_path / "xla"
    cmd = [sys.executable, "-m", "pali_jax.annotate", "--model", str(DEMO_MODEL), "--images", str(folder),
           "--prompt", "caption en", "--out", str(out), "--slots", str(SLOTS), "--no-progress",
           "--compilation-cache", str(cache)]
    env = {**os.environ, "XLA_FLAGS": FAST_XLA, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not (out.exists() and out.stat().st_size):
        time.sleep(0.002)
    time.sleep(float(np.random.default_rng().uniform(0, 0.05)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.exists(), proc.stderr.read().decode()
    annotate_to_file(demo, [Item(i.image) for i in images], out, "caption en", **JOB, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(i.image for i in images)


@pytest.mark.parametrize("changes, message", [
    ({"--slots": "0"}, "--slots must be in [1, 1024], got 0"),
    ({"--workers": "100"}, "--workers must be in [1, 64]"),
    ({"--beams": "2"}, "--beams: annotate decodes greedily or by sampling"),
    ({"--top-p": "2"}, "--top-p must be in (0, 1]"),
    ({"--images": "{tmp}/nothing"}, "no such folder or .jsonl file"),
    ({"--images": "{tmp}/outside.jsonl"}, "leaves the directory of the data file"),
    ({"--images": "{tmp}/no_prompt.jsonl", "--prompt": None}, "no prompt"),
    ({"--out": "{tmp}"}, "is a folder"),
    ({"--bogus": ""}, "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, images, changes, message):
    (tmp_path / "outside.jsonl").write_text(json.dumps({"image": "../x.png", "prompt": "caption en"}) + "\n")
    (tmp_path / "no_prompt.jsonl").write_text(json.dumps({"image": "x.png"}) + "\n")
    args = {"--model": str(DEMO_MODEL), "--images": str(Path(images[0].image).parent), "--prompt": "caption en",
            "--out": str(tmp_path / "r.jsonl")}
    args.update({flag: value and value.format(tmp=tmp_path) for flag, value in changes.items()})
    argv = [x for flag, value in args.items() if value is not None for x in (flag, value) if x != ""]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err
