"""A measurement in a fresh process (its own peak RSS, compile caches and allocator): the parent
runs `python -m MODULE --child SPEC_JSON OUT`, the module's `child(spec)` writes its result there."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def run(module: str, spec: dict, tmp: Path) -> dict:
    """`module`'s `child(spec)`, run in a new interpreter; its JSON result."""
    out = tmp / "child.json"
    subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec), str(out)], check=True)
    return json.loads(out.read_text())


def serve(child: Callable[[dict], dict]) -> bool:
    """In a child process (argv `--child SPEC_JSON OUT`): runs `child` and writes its result; True."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        Path(sys.argv[3]).write_text(json.dumps(child(json.loads(sys.argv[2]))))
        return True
    return False
