"""Benchmarks write their own tables into docs/performance.md, stamped with the machine that ran them.

    from benchmarks import report

    p = argparse.ArgumentParser(...)
    report.add_arguments(p)                     # --no-report, --note
    args = p.parse_args()
    ...
    report.write(args, "decode_capacity", ["cache slots", "decode ms/token"], rows)

A section of docs/performance.md is the text between `<!-- begin NAME -->` and `<!-- end NAME -->`;
`write` replaces it with the command that ran (`python -m benchmarks.X ...`), the date, the
device (the CPU model from /proc/cpuinfo and its core count, or the accelerator's kind), the
versions of jax, jaxlib, transformers and torch, the note, and the table. Nobody types a figure
into that file. The file is replaced atomically; a missing section is an error (add its markers
under a heading first).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

PERFORMANCE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
VERSIONED = ("jax", "jaxlib", "transformers", "torch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every reporting benchmark takes."""
    parser.add_argument("--no-report", action="store_true", help="do not write docs/performance.md")
    parser.add_argument("--note", default="", help="a sentence about the run (e.g. the machine's load), "
                                                   "written under the table")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> str:
    """The accelerator's kind and count if JAX runs on one, else the CPU model and its cores."""
    if "jax" in sys.modules:
        import jax

        devices = jax.devices()
        if devices[0].platform != "cpu":
            return f"{len(devices)} x {devices[0].device_kind}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores"


def versions() -> str:
    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def command() -> str:
    """How this benchmark was started, as a user would type it."""
    module = Path(sys.argv[0]).stem
    args, skip = [], False
    for arg in sys.argv[1:]:  # --note is printed as the note, not in the command
        if skip or arg == "--note" or arg.startswith("--note="):
            skip = arg == "--note"
            continue
        args.append(arg)
    return shlex.join(["python", "-m", f"benchmarks.{module}", *args])


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(mapping: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """A nested dict of results as (dotted key, value) rows."""
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += flatten(value, name + ".")
        elif isinstance(value, (list, tuple)) and len(value) > 8:
            rows.append((name, f"{len(value)} values"))
        else:
            rows.append((name, value))
    return rows


def section_text(columns: Sequence[str], rows: Sequence[Sequence], note: str = "") -> str:
    stamp = (f"`{command()}`  \n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"{device()}; {versions()}.")
    parts = [stamp, table(columns, rows)]
    if note:
        parts.append(note)
    return "\n\n".join(parts)


def replace_section(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise KeyError(f"no section {name!r} ({begin} ... {end}) in the performance file")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)


def write(args: argparse.Namespace, name: str, columns: Sequence[str], rows: Sequence[Sequence], note: str = "",
          path: Path = PERFORMANCE) -> None:
    """Replaces section `name` of `path` with this run's table, unless --no-report."""
    if getattr(args, "no_report", False):
        return
    note = " ".join(filter(None, [note, getattr(args, "note", "")]))
    text = replace_section(path.read_text(), name, section_text(columns, rows, note))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"written: section {name} of {path}", file=sys.stderr)
