"""The example notebooks run top to bottom on a CPU, and each cell produces the
outputs the prose points at: its lines are there, read consistently (the tallies match the answers
printed, the rates their counts) and the invariants they show hold (the mask's zero block, the cache's
slots). How often the demo model's maps find the circle is measured by benchmarks/circle_attention.py,
not asserted here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CELL_TIMEOUT_S = 600  # a hung cell fails the test; how long the notebooks take is not a test's business


def run_notebook(name: str) -> tuple[str, int]:
    """Executes examples/<name> from its folder; returns its printed text and how many PNG images it
    displayed."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    # The kernel is a process of its own: give it the checkout that pytest imports (pyproject's
    # pythonpath), not whichever pali_jax is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # The notebooks compute over many images: conftest's optimization level 0 would cost more than it saves
    # (inspect.ipynb: 8x the CPU time). Its choice of fusion emitters stays: it only shortens compiles.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(
        ("--xla_backend_optimization_level", "--xla_llvm_disable_expensive_passes")))
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute(env=env)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "\n".join(out.get("text", "") for out in outputs)
    return text, sum("image/png" in out.get("data", {}) for out in outputs)


def test_quickstart_notebook_runs():
    text, images = run_notebook("quickstart.ipynb")
    assert re.search(r"caption: an? \w+ (circle|square|triangle)", text)
    assert images >= 1
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", text)]
    assert len(losses) >= 5 and losses[-1] < 0.5 * losses[0], losses  # the fine-tuning cell trains
    # The held-out cell prints each scene's caption and the tuned model's answer, then its own tally.
    answers = re.findall(r"^(an? .+?) +-> (\w*)$", text, flags=re.M)
    assert len(answers) == 8, text
    right = sum(answer == ("two" if " and " in caption else "one") for caption, answer in answers)
    assert f"right: {right} of 8" in text


def test_inspect_notebook_runs():
    text, images = run_notebook("inspect.ipynb")
    # Image, word maps, head grid, mask, attention matrices, logit lens, attributions, cache.
    assert images >= 8, text
    caption = re.search(r"^caption: (.+)$", text, flags=re.M).group(1)
    assert f"truth:   {caption}\n" in text  # the maps are read on a right answer
    # The teacher-forced forward is what the decode steps computed, and the cache's slots are
    # Result's positions: the notebook reads one for the other.
    assert float(re.search(r"largest attention difference: (\S+)", text).group(1)) < 1e-4
    assert "slots match Result's positions: True" in text
    assert re.findall(r"prefix -> suffix (\S+)", text) == ["0.0e+00"] * 3  # the mask's zero block
    assert "last layer's top-1 is the generated token at every position: True" in text
    lens = re.findall(r"top-1 after (\d) of (\d) layers", text)
    assert lens and all(int(k) <= int(depth) for k, depth in lens), text
    # One key more per step, none of them padding: every step's keys start at the prompt's first slot.
    start = re.search(r"prompt fills slots (\d+)\.\.", text).group(1)
    steps = re.findall(r"^step \d+ \(.*\): (\d+) keys attended, slots (\d+)\.\.", text, flags=re.M)
    counts = [int(count) for count, _ in steps]
    assert counts and counts == list(range(counts[0], counts[0] + len(counts))), steps
    assert {first for _, first in steps} == {start}, (start, steps)
    shares = [float(x) for x in re.findall(r"share in the circle's cell ([\d.]+)", text)]
    assert len(shares) == 2 and all(0 <= s <= 1 for s in shares), shares
    # The last section: one line per map, each a count of the captions that named the circle.
    named = int(re.search(r"captions naming the circle: (\d+) of 30", text).group(1))
    hits = re.findall(r"^  (\w[^\n]*?) +(\d+)/(\d+) = (\d+)%$", text, flags=re.M)
    assert len(hits) == 5, text
    for name, hit, n, percent in hits:
        assert int(n) == named and 0 <= int(hit) <= named, name
        assert abs(int(percent) - 100 * int(hit) / named) <= 0.5 + 1e-9, (name, hit, percent)
    misses = re.search(r"decoder-attention misses: (\d+), of which (\d+) peak on the other shape, (\d+) on background",
                       text)
    decoder_hits = int(dict((name, hit) for name, hit, _, _ in hits)["decoder attention (mean of layers, heads)"])
    assert int(misses.group(1)) == named - decoder_hits == int(misses.group(2)) + int(misses.group(3)), misses.group(0)
