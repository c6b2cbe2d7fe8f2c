"""The dataset job: continuous batching gives one-by-one answers, the results file resumes, bad
input is one line. On the bundled demo model (trained: its answers differ in length by prompt)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pali_jax import PaliGemma
from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax import cli
from pali_jax.annotate import Item, JobStats, annotate, annotate_to_file
from pali_jax.continuous import _refill_sizes
from pali_jax.demo import shapes
from pali_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"
SLOTS = 4  # one slot count and cache size for every test here: programs compile once per slot shape
SPARE = 4  # spare cache slots: after 32 + 4 steps the cache shifts, then every 4 steps or more
JOB = {"slots": SLOTS, "spare_slots": SPARE}


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
    alone = {}  # the 20 items come three times: `generate` alone once for each
    for item, record in zip(items, records):
        key = (item.image, item.prompt, item.max_new_tokens or 20)
        if key not in alone:
            alone[key] = one_by_one(demo, item, key[2])
        assert record["token_ids"] == alone[key], item
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
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # XLA_FLAGS: conftest's cheap code generation
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
    ({"--greedy": "", "--top-k": "3"}, "--greedy conflicts with --temperature"),
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
    assert cli.main(["annotate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err


# -- nothing lost, whatever --out is -------------------------------------------------------------
def _cli(capsys, *argv) -> tuple[int, str]:
    """`pali-jax annotate` on the demo model, in this process: (exit code, stderr)."""
    code = cli.main(["annotate", "--model", str(DEMO_MODEL), "--no-progress", "--slots", str(SLOTS),
                     "--no-compilation-cache", *map(str, argv)])
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, message: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


@pytest.mark.parametrize("content", [b'{"model": "x", "lr": 0.001}', b"line 1\nline 2 (no newline)",
                                     b'{"image": "a.png", "prompt": "caption en"}\n'])
def test_a_file_that_is_not_this_jobs_results_is_kept(images, tmp_path, capsys, content):
    """A user's file (no newline at its end, or result-like lines without the job's record) is
    neither cut nor replaced nor appended to."""
    out = tmp_path / "settings.json"
    out.write_bytes(content)
    code, err = _cli(capsys, "--images", Path(images[0].image).parent, "--prompt", "caption en", "--out", out)
    _one_line(code, err, "refusing to append to or rewrite it")
    assert out.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]


def test_out_that_is_the_input_file_is_refused(images, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": i.image, "prompt": i.prompt}) + "\n" for i in images[:3]))
    before = data.read_bytes()
    code, err = _cli(capsys, "--images", data, "--allow-outside-paths", "--out", data)
    _one_line(code, err, "is also an input of this job")
    assert data.read_bytes() == before


def _device(path: Path) -> None:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("mknod of a character device needs root")


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_out_that_is_not_a_regular_file_is_refused_unopened(images, tmp_path, capsys, kind):
    out = tmp_path / "out"
    {"fifo": os.mkfifo, "device": _device, "folder": os.mkdir}[kind](out)
    # Held open for reading and writing: an open() by the job would not block this test, it would only
    # show as a missing refusal.
    holder = os.open(out, os.O_RDONLY) if kind == "folder" else os.open(out, os.O_RDWR | os.O_NONBLOCK)
    try:
        mode = out.lstat().st_mode
        code, err = _cli(capsys, "--images", Path(images[0].image).parent, "--prompt", "caption en", "--out", out)
    finally:
        os.close(holder)
    _one_line(code, err, {"fifo": "is a FIFO", "device": "is a device", "folder": "is a folder"}[kind])
    assert out.lstat().st_mode == mode and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", ["max tokens beyond the model", "a line's max_new_tokens", "no such model",
                                  "no such mask decoder", "stop on a bad image"])
def test_failed_checks_create_no_output(images, tmp_path, capsys, case):
    folder = Path(images[0].image).parent
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": images[0].image, "max_new_tokens": 100000}) + "\n")
    argv, message = {
        "max tokens beyond the model": (["--max-tokens", "99999999999999999999999"], "--max-tokens must be <="),
        "a line's max_new_tokens": (["--images", data, "--allow-outside-paths"], f"{data}:1: max_new_tokens must be <="),
        "no such model": (["--model", tmp_path / "nonexistent"], "is not a local directory"),
        "no such mask decoder": (["--seg-vae", tmp_path / "vae.npz"], "vae.npz"),
        "stop on a bad image": (["--images", tmp_path / "bad", "--stop-on-error"], "--stop-on-error"),
    }[case]
    defaults = {"--images": folder, "--prompt": "caption en", "--out": tmp_path / "out.jsonl"}
    argv = [*argv, *(x for flag, value in defaults.items() if flag not in argv for x in (flag, value))]
    code, err = _cli(capsys, *argv)
    _one_line(code, err, message)
    assert "--max-tokens" not in err or case == "max tokens beyond the model", err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.job.json").exists()


def test_bad_job_settings_through_the_api_create_no_output(demo, images, tmp_path):
    with pytest.raises(ValueError, match="slots"):
        annotate_to_file(demo, images[:2], tmp_path / "out.jsonl", slots=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_resume_with_other_options_is_refused_and_a_symlink_stays_one(demo, images, tmp_path):
    target = tmp_path / "real.jsonl"
    out = tmp_path / "out.jsonl"
    out.symlink_to(target.name)
    annotate_to_file(demo, images[:3], out, **JOB, max_new_tokens=8, progress=False)
    before = target.read_bytes()
    with pytest.raises(ValueError, match=r"another job \(max_new_tokens: 8 -> 9\)"):
        annotate_to_file(demo, images[:4], out, **JOB, max_new_tokens=9, progress=False)
    assert target.read_bytes() == before
    stats = annotate_to_file(demo, images[:4], out, **JOB, max_new_tokens=8, progress=False)
    assert (stats.already_done, stats.answered) == (3, 1)
    assert out.is_symlink() and len(target.read_text().splitlines()) == 4


def test_a_killed_runs_temporary_is_removed_by_the_next(demo, images, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.jsonl.tmp-{dead.pid}"  # a `finish` killed before its rename
    stale.write_text("half")
    annotate_to_file(demo, images[:2], tmp_path / "out.jsonl", **JOB, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.job.json"]


def test_a_failed_write_stops_the_job_in_one_line(images, tmp_path):
    """A file size limit (SIGXFSZ ignored: writes fail with EFBIG) stands for a full disk."""
    out = tmp_path / "out.jsonl"
    cmd = (f"{sys.executable} -m pali_jax.annotate --model {DEMO_MODEL} --images {Path(images[0].image).parent} "
           f"--prompt 'caption en' --out {out} --slots {SLOTS} --no-progress --no-compilation-cache")
    proc = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 2; exec {cmd}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: File too large"), proc.stderr
    complete = out.read_bytes().split(b"\n")[:-1]  # the write that failed may have left part of its line
    assert out.stat().st_size <= 2048 and complete and all(json.loads(line)["text"] for line in complete)


# -- a job across machines: shards and their merge -----------------------------------------------
@pytest.fixture()
def sharded(demo, images, tmp_path):
    """A JSONL of 9 items (mixed prompts: an uneven split), answered whole and as two shards."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": Path(i.image).name, "prompt": i.prompt}) + "\n" for i in images[:9]))
    for i in images[:9]:
        (tmp_path / Path(i.image).name).write_bytes(Path(i.image).read_bytes())
    from pali_jax.annotate import read_items

    items = read_items(str(data))
    job = {**JOB, "progress": False, "timings": False, "max_new_tokens": 20}
    annotate_to_file(demo, items, tmp_path / "whole.jsonl", **job)
    for k in range(2):
        annotate_to_file(demo, items, tmp_path / f"part{k}.jsonl", shard=(k, 2), **job)
    return tmp_path, data


def test_shards_merge_into_the_unsharded_file(sharded, capsys):
    root, data = sharded
    assert [len((root / f"part{k}.jsonl").read_text().splitlines()) for k in range(2)] == [5, 4]
    code = cli.main(["annotate", "--merge", root / "part1.jsonl", root / "part0.jsonl", "--images", data,
                     "--out", root / "merged.jsonl"])
    assert code == 0, capsys.readouterr().err
    assert (root / "merged.jsonl").read_bytes() == (root / "whole.jsonl").read_bytes()
    assert (root / "merged.jsonl.job.json").read_bytes() == (root / "whole.jsonl.job.json").read_bytes()
    assert "timings" not in (root / "whole.jsonl").read_text()


def _drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


@pytest.mark.parametrize("case, message", [
    ("one missing", "shard 1/2 missing"),
    ("twice", "shard 0/2 is given twice"),
    ("incomplete", "shard 1/2 is incomplete"),
    ("foreign", "not the results file of a pali-jax annotate --shard run"),
    ("unsharded", "not the results of a --shard run"),
    ("other job", "another job's shard"),
    ("out exists", "exists and is not empty"),
    ("with --model", "not --model or --shard"),
])
def test_bad_merges_are_one_line_and_write_nothing(sharded, capsys, case, message):
    root, data = sharded
    parts = [root / "part0.jsonl", root / "part1.jsonl"]
    extra = []
    if case == "one missing":
        parts = parts[:1]
    elif case == "twice":
        parts = [parts[0], parts[0], parts[1]]
    elif case == "incomplete":
        _drop_last_line(parts[1])
    elif case == "foreign":
        (root / "user.jsonl").write_text('{"image": "a.png", "prompt": "caption en"}\n')
        parts[1] = root / "user.jsonl"
    elif case == "unsharded":
        parts[1] = root / "whole.jsonl"
    elif case == "other job":
        job = json.loads((root / "part1.jsonl.job.json").read_text())
        (root / "part1.jsonl.job.json").write_text(json.dumps({**job, "max_new_tokens": 7}))
    elif case == "out exists":
        (root / "merged.jsonl").write_text("keep me\n")
    elif case == "with --model":
        extra = ["--model", str(DEMO_MODEL)]
    before = sorted(p.name for p in root.iterdir())
    code = cli.main(["annotate", "--merge", *parts, "--images", data, "--out", root / "merged.jsonl", *extra])
    _one_line(code, capsys.readouterr().err, message)
    assert sorted(p.name for p in root.iterdir()) == before
    if case == "out exists":
        assert (root / "merged.jsonl").read_text() == "keep me\n"


@pytest.mark.parametrize("shard", ["2/2", "0/0", "1", "a/b", "-1/2"])
def test_bad_shard_is_one_line(images, tmp_path, capsys, shard):
    code = cli.main(["annotate", "--model", str(DEMO_MODEL), "--images", str(Path(images[0].image).parent),
                     "--prompt", "caption en", "--out", str(tmp_path / "r.jsonl"), f"--shard={shard}"])
    _one_line(code, capsys.readouterr().err, f"--shard {shard}")
    assert list(tmp_path.iterdir()) == []
