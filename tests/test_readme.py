"""Every command and code block of the README runs, so the README cannot rot.

Real checkpoints cannot be downloaded here: the hub id the README uses is served from a local hub
cache that holds a tiny model under that name, and `cat.jpg`, `dog.jpg` and `photos/` are real
photographs from scikit-image, and `train.jsonl` holds the README's own training line. The set-up commands are checked against `.ci/run`, which runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import skimage.data

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
HUB_ID = "google/paligemma2-3b-mix-224"
SETUP_DEMO = 'pip install -e . && python run_generate.py'
SETUP_TESTS = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, checkpoint):
    """A working directory with the README's files, and an environment whose hub cache holds a
    tiny PaliGemma under the README's hub id."""
    from test_cli import _hub_cache

    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    (work / "run_generate.py").symlink_to(ROOT / "run_generate.py")
    PIL.Image.fromarray(skimage.data.chelsea()).save(work / "cat.jpg")
    PIL.Image.fromarray(skimage.data.astronaut()).save(work / "dog.jpg")
    (work / "photos").mkdir()
    for name in ("coffee", "rocket"):
        PIL.Image.fromarray(getattr(skimage.data, name)()).save(work / "photos" / f"{name}.png")
    [example] = blocks("json")  # the README's training line, used by its fine-tuning command
    (work / "train.jsonl").write_text(example.strip() + "\n" + example.replace("cat.jpg", "dog.jpg").strip() + "\n")
    shutil.copytree(checkpoint["hf_dir"], work / HUB_ID.split("/")[1])  # the README's local HF directory
    cache = _hub_cache(root, HUB_ID, checkpoint["hf_dir"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "home"),
           "PYTHONPATH": str(ROOT)}
    return work, env


def run(command: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=600,
                          executable="/bin/bash")


def test_setup_commands_are_what_ci_runs():
    setup = blocks("bash")[:2]
    assert [b.strip() for b in setup] == [SETUP_DEMO, SETUP_TESTS]
    assert SETUP_TESTS in (ROOT / ".ci" / "run").read_text()


def test_demo_command(sandbox):
    work, env = sandbox
    demo = SETUP_DEMO.split(" && ")[1]  # the install is what CI's own install already did
    proc = run(demo, ROOT, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "bundled demo model" in proc.stderr


def test_shell_blocks(sandbox):
    work, env = sandbox
    for block in blocks("bash")[2:]:
        for command in block.strip().splitlines():
            proc = run(command, work, env)
            assert proc.returncode == 0, f"{command}\n{proc.stderr}"
            assert proc.stdout.strip(), command


def test_python_blocks(sandbox):
    work, env = sandbox
    code = "\n".join(blocks("python"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
