"""Faults: processes killed at random points, a full disk, racing writers, a loss that diverges.

A few of benchmarks/kill_points.py's random kill points run here (conversion: three; fine-tuning:
one, with its uninterrupted reference); `python -m benchmarks.kill_points` runs 20 + 20.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import kill_points
from pali_jax.model_dir import verify

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("trial", range(3))
def test_conversion_killed_at_a_random_point(checkpoint, tmp_path, trial):
    """SIGKILL / SIGINT somewhere in the reading and writing: DST absent or complete, SIGINT in
    one line, and the next conversion succeeds and cleans up after the killed one."""
    rng = np.random.default_rng(100 + trial)
    sig = (signal.SIGKILL, signal.SIGINT, signal.SIGKILL)[trial]
    record = kill_points.conversion_trial(checkpoint["hf_dir"], tmp_path / "work", float(rng.uniform(1.0, 4.0)), sig)
    assert record["problems"] == [], record


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return kill_points.make_shapes_data(tmp_path_factory.mktemp("shapes"))


def test_finetune_interrupted_then_resumed_gives_the_uninterrupted_result(shapes_data, tmp_path):
    """Ctrl-C in the middle of fine-tuning: one line, exit 130; --resume then ends with the
    uninterrupted run's loss and exported weights."""
    reference = kill_points.finetune_reference(kill_points.DEMO_MODEL, shapes_data, tmp_path / "reference")
    record = kill_points.finetune_trial(kill_points.DEMO_MODEL, shapes_data, tmp_path / "run", 0.7 * reference[0],
                                        signal.SIGINT, reference)
    assert record["problems"] == [], record
    assert record["exit"] in (0, 130) and record["max_rel_weight_diff"] <= 1e-6


def test_two_conversions_racing_into_one_destination(checkpoint, tmp_path):
    """Both start before either finishes: one writes DST, the other fails in one line; DST verifies."""
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-m", "convert.hf_to_flax", str(checkpoint["hf_dir"]), str(dst)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    [err] = [err for code, err in results if code == 2]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert any(m in err for m in ("already exists", "another process is writing", "appeared while")), err
    assert verify(dst) > 3 and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_full_disk_is_one_line_and_leaves_nothing(checkpoint, tmp_path):
    """A file size limit (`ulimit -f`, SIGXFSZ ignored so that writes fail instead of killing)
    smaller than the largest parameter array stands for a full disk."""
    convert = f"{sys.executable} -m convert.hf_to_flax {checkpoint['hf_dir']} {tmp_path / 'dst'}"
    proc = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 100; exec {convert}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "ulimit -f" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_loss_stops_in_one_line(shapes_data, tmp_path):
    """--lr 1e30 is finite, so it passes the checks; the loss then becomes NaN/inf, which stops the
    run (exit 2, the step named) before a NaN checkpoint or export is written. --resume on a run
    directory without checkpoints says that it starts from step 0."""
    out = tmp_path / "run"
    proc = subprocess.run(
        kill_points.finetune_command(kill_points.DEMO_MODEL, shapes_data, out, "--lr", "1e30", "--resume"),
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=kill_points._env(),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == f"warning: --resume: no checkpoint in {out / 'checkpoints'} yet, starting from step 0"
    assert lines[-1].startswith("error: the loss became") and "lower --lr" in lines[-1], lines
    assert not (out / "model").exists()
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()] if (out / "checkpoints").exists() else []
    step = int(lines[-1].split(" at step ")[1].split()[0])
    assert all(int(s) < step for s in saved)
