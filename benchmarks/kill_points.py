"""Kills conversions and fine-tuning runs at random points and checks what they leave behind.

    python -m benchmarks.kill_points [--conversions 20] [--finetunes 20] [--seed 0] [--out kill_points.json]

Each conversion trial starts `python -m convert.hf_to_flax SRC DST`, sends SIGKILL or SIGINT
(alternating) after a random delay: for half the trials 45-95% of the fastest of 3 uninterrupted
runs (the first half is Python's imports), for the other half 0-150 ms after the write began; then
checks: DST is absent or complete (`convert.verify` passes); after SIGINT the process printed at
most `error: interrupted` (no traceback) and left no temporary directory; a second conversion
(`--overwrite`) succeeds, verifies, and leaves no hidden entry (stale temporaries of the killed
run are removed).

Each fine-tuning trial starts `python -m pali_jax.finetune` (checkpoints every 2 steps), kills it
likewise, checks that RUN/model is absent or complete, then runs the same command with
`--resume` and compares with an uninterrupted run (kills at 30-90% of its duration): the same final loss and the same exported
weights (float32 rounding: max relative difference 1e-6).

The models: a tiny transformers PaliGemma (tests/hf_models.py) for conversions, the bundled demo
model for fine-tuning. Run time on 2 shared cores: about 30 minutes for 20 + 20. Prints one line per
trial and a summary; exits 1 if any trial left an unusable state.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"
FINETUNE_ARGS = ("--steps", "8", "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "2", "--keep", "2",
                 "--no-progress", "--trainable", "llm")
_FINAL_LOSS = re.compile(r"trained steps \d+\.\.(\d+) in .*loss [\d.]+ -> ([\d.]+)")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def make_hf_checkpoint(directory: Path) -> Path:
    """A tiny HF PaliGemma 2 with the tests' tiny tokenizer (needs torch and transformers)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import hf_models
    from tokenizer_utils import train_tokenizer

    src = hf_models.save(hf_models.build("pg2", seed=3), directory / "hf")
    train_tokenizer(directory / "tok")
    shutil.copy(directory / "tok" / "tokenizer.model", src / "tokenizer.model")
    return src


def make_shapes_data(directory: Path, n_scenes: int = 32) -> Path:
    """A JSONL file of a task new to the demo model (counting shapes, as the notebook teaches), so
    that the loss moves and the resumed run's losses are worth comparing."""
    import PIL.Image

    from pali_jax.demo import shapes

    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(shapes.scenes(n_scenes, 5)):
        PIL.Image.fromarray(shapes.render(scene)).save(directory / "images" / f"{i}.png")
        prefix, suffix = shapes.count_prompt(scene)
        lines.append(json.dumps({"image": f"images/{i}.png", "prefix": prefix, "suffix": suffix}))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _interrupt(cmd: list[str], delay: float, sig: int, after: Path | None = None) -> tuple[int, str]:
    """Runs `cmd`, sends `sig` after `delay` seconds (unless it ended first): (exit code, stderr).
    With `after`, the delay counts from the moment a `.NAME.tmp-*` sibling of `after` appears
    (the write has begun)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while after is not None and proc.poll() is None and not list(after.parent.glob(f".{after.name}.tmp-*")):
        time.sleep(0.002)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _check_interrupt_output(code: int, err: str, sig: int) -> str | None:
    """What is wrong with how an interrupted process ended; None if nothing."""
    if "Traceback" in err:
        return "traceback on stderr: " + err.strip().splitlines()[-1]
    if sig == signal.SIGINT and code == -signal.SIGINT and not err:
        return None  # interrupted while Python itself started, before any of pali-jax's code: nothing done
    if sig == signal.SIGINT and code not in (0, 130):
        return f"exit code {code} after SIGINT; stderr ends {err[-300:]!r}"
    if sig == signal.SIGINT and code == 130 and not err.endswith("error: interrupted\n"):
        return f"SIGINT did not end with one line: {err[-200:]!r}"
    return None


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def conversion_trial(src: Path, work: Path, delay: float, sig: int, in_write: bool = False) -> dict:
    """One killed conversion and the conversion after it (see the module docstring); `in_write`:
    `delay` counts from the start of the write."""
    from pali_jax.model_dir import verify

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dst = work / "dst"
    cmd = [sys.executable, "-m", "convert.hf_to_flax", str(src), str(dst)]
    code, err = _interrupt(cmd, delay, sig, dst if in_write else None)
    record = {"kind": "conversion", "signal": signal.Signals(sig).name, "delay_s": round(delay, 3),
              "from": "write start" if in_write else "launch", "exit": code,
              "dst_after_kill": "complete" if dst.exists() else "absent", "problems": []}
    problem = _check_interrupt_output(code, err, sig)
    if problem:
        record["problems"].append(problem)
    if dst.exists():
        try:
            verify(dst)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            record["problems"].append(f"DST exists but does not verify: {e}")
    if sig == signal.SIGINT and _hidden(work):
        record["problems"].append(f"SIGINT left {_hidden(work)}")
    record["left_after_kill"] = _hidden(work)
    again = subprocess.run([*cmd, "--overwrite"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if again.returncode != 0:
        record["problems"].append(f"the next conversion failed: {again.stderr.strip()[-300:]}")
    else:
        try:
            verify(dst)
        except Exception as e:  # noqa: BLE001
            record["problems"].append(f"the next conversion does not verify: {e}")
    if _hidden(work):
        record["problems"].append(f"the next conversion left {_hidden(work)}")
    return record


def _exported(run_dir: Path) -> dict[str, np.ndarray]:
    from pali_jax.checkpoint import restore_params

    import jax

    flat = jax.tree_util.tree_flatten_with_path(restore_params(run_dir / "model" / "params"))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def finetune_command(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pali_jax.finetune", "--model", str(model), "--train", str(train), "--out", str(out),
            *FINETUNE_ARGS, *extra]


def finetune_reference(model: Path, train: Path, out: Path) -> tuple[float, float, dict[str, np.ndarray]]:
    """An uninterrupted run: (seconds, final loss, exported weights)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(finetune_command(model, train, out), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the reference fine-tuning failed: {proc.stderr[-2000:]}")
    return seconds, float(_FINAL_LOSS.search(proc.stderr)[2]), _exported(out)


def finetune_trial(model: Path, train: Path, out: Path, delay: float, sig: int, reference) -> dict:
    """One killed fine-tuning run and its --resume (see the module docstring)."""
    from pali_jax.model_dir import verify

    _, ref_loss, ref_params = reference
    shutil.rmtree(out, ignore_errors=True)
    code, err = _interrupt(finetune_command(model, train, out), delay, sig)
    record = {"kind": "finetune", "signal": signal.Signals(sig).name, "delay_s": round(delay, 3), "exit": code,
              "problems": []}
    problem = _check_interrupt_output(code, err, sig)
    if problem:
        record["problems"].append(problem)
    ckpts = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) \
        if (out / "checkpoints").is_dir() else []
    record["checkpoints_after_kill"] = ckpts
    record["model_after_kill"] = "complete" if (out / "model").exists() else "absent"
    if (out / "model").exists():
        try:
            verify(out / "model")
        except Exception as e:  # noqa: BLE001
            record["problems"].append(f"RUN/model exists but does not verify: {e}")
    resumed = subprocess.run(finetune_command(model, train, out, "--resume"), cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=900)
    if resumed.returncode != 0:
        record["problems"].append(f"--resume failed: {resumed.stderr.strip()[-300:]}")
        return record
    m = _FINAL_LOSS.search(resumed.stderr)
    if m:  # (a run killed after its last step has nothing left to train, and prints no loss)
        record["final_loss"] = float(m[2])
        if abs(float(m[2]) - ref_loss) > 1e-4 * max(1.0, abs(ref_loss)):
            record["problems"].append(f"final loss {m[2]} != uninterrupted {ref_loss}")
    params = _exported(out)
    worst = max(float(np.max(np.abs(params[k] - v)) / (np.max(np.abs(v)) + 1e-12)) for k, v in ref_params.items())
    record["max_rel_weight_diff"] = worst
    if worst > 1e-6:
        record["problems"].append(f"exported weights differ from the uninterrupted run's (max rel {worst:.2e})")
    return record


def _timed_conversion(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convert.hf_to_flax", str(src), str(dst)], cwd=ROOT, env=_env(), check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kill_points", description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversions", type=int, default=20)
    parser.add_argument("--finetunes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="kill_points.json")
    report.add_arguments(parser)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    records = []
    with tempfile.TemporaryDirectory(prefix="kill-points-") as tmp:
        tmp = Path(tmp)
        if args.conversions:
            src = make_hf_checkpoint(tmp)
            full = min(_timed_conversion(src, tmp / f"ref{i}") for i in range(3))  # a loaded machine varies
            print(f"conversion: an uninterrupted run takes {full:.1f} s", flush=True)
            for i in range(args.conversions):
                sig = signal.SIGKILL if i % 2 == 0 else signal.SIGINT
                # Imports take the first half: aim the kills at the reading and writing; every other
                # pair of trials at the write itself (the temporary directory exists), 0-150 ms in.
                if i % 4 < 2:
                    records.append(conversion_trial(src, tmp / "conv", float(full * rng.uniform(0.45, 0.95)), sig))
                else:
                    records.append(conversion_trial(src, tmp / "conv", float(rng.uniform(0, 0.15)), sig, in_write=True))
                print(json.dumps(records[-1]), flush=True)
        if args.finetunes:
            train = make_shapes_data(tmp / "data")
            reference = finetune_reference(DEMO_MODEL, train, tmp / "ref-run")
            print(f"fine-tuning: an uninterrupted run takes {reference[0]:.1f} s, final loss {reference[1]}", flush=True)
            for i in range(args.finetunes):
                sig = signal.SIGKILL if i % 2 == 0 else signal.SIGINT
                delay = float(reference[0] * rng.uniform(0.3, 0.9))
                records.append(finetune_trial(DEMO_MODEL, train, tmp / "run", delay, sig, reference))
                print(json.dumps(records[-1]), flush=True)
    bad = [r for r in records if r["problems"]]
    summary = {kind: sum(r["kind"] == kind for r in records) for kind in ("conversion", "finetune")}
    print(f"{len(records)} trials ({summary}); {len(bad)} left an unusable state or printed a traceback", flush=True)
    Path(args.out).write_text(json.dumps({"trials": records, "failures": len(bad)}, indent=1))
    rows = [(r["kind"], r["signal"], f"{r['delay_s']:.3f}", r.get("from", "launch"), r["exit"],
             "; ".join(r["problems"]) or "none") for r in records]
    report.write(args, "kill_points", ["run", "signal", "after s", "counted from", "exit", "problems"], rows,
                 note=f"{len(records)} trials, {len(bad)} left an unusable state or printed a traceback.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
