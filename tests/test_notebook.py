"""examples/quickstart.ipynb runs top to bottom on a CPU, and its fine-tuning teaches the demo model to count."""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"
BUDGET_S = 180


def test_quickstart_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert time.perf_counter() - start < BUDGET_S
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert re.search(r"caption: an? \w+ (circle|square|triangle)", text)
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", text)]
    assert len(losses) >= 5 and losses[-1] < 0.5 * losses[0], losses
    # The fine-tuned model counts the shapes of images it has not seen: each answer against the
    # scene's caption ("... and ..." is two shapes), and the notebook's own tally.
    answers = re.findall(r"^(an? .+?) +-> (\w*)$", text, flags=re.M)
    assert len(answers) == 8, text
    right = sum(answer == ("two" if " and " in caption else "one") for caption, answer in answers)
    assert right >= 7, answers
    assert f"right: {right} of 8" in text
