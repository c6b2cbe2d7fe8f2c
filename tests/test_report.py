"""benchmarks/report.py: benchmarks replace their own section of docs/performance.md, stamped, and
every section a benchmark writes exists there."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]

PAGE = """# Performance

## One
<!-- begin one -->
Not measured.
<!-- end one -->

## Two
<!-- begin two -->
old | table
<!-- end two -->
"""


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_write_replaces_only_its_section_with_a_stamped_table(tmp_path, monkeypatch):
    page = tmp_path / "performance.md"
    page.write_text(PAGE)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "two.py"), "--runs", "3", "--note", "A busy machine."])
    report.write(args("--note", "A busy machine."), "two", ["batch", "ms | call"], [(1, 3.14159), (16, 1234.5)],
                 note="Medians.", path=page)
    text = page.read_text()
    assert text.startswith(PAGE[: PAGE.index("## Two")])  # section one untouched
    body = re.search(r"<!-- begin two -->\n(.*)\n<!-- end two -->\n$", text, flags=re.S).group(1)
    assert "old | table" not in body
    assert body.splitlines()[0] == "`python -m benchmarks.two --runs 3`  "  # the note is not part of the command
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC; .+, \d+ cores; jax \S+, jaxlib \S+, transformers \S+, torch \S+\.",
                     body)
    assert "| batch | ms \\| call |\n| --- | --- |\n| 1 | 3.14 |\n| 16 | 1234 |" in body
    assert body.endswith("Medians. A busy machine.")
    assert [p.name for p in tmp_path.iterdir()] == ["performance.md"]  # no temporary file left


def test_no_report_writes_nothing_and_a_missing_section_is_an_error(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(PAGE)
    report.write(args("--no-report"), "one", ["a"], [(1,)], path=page)
    assert page.read_text() == PAGE
    with pytest.raises(KeyError, match="no section 'three'"):
        report.write(args(), "three", ["a"], [(1,)], path=page)
    assert page.read_text() == PAGE


def test_flatten_names_nested_results():
    assert report.flatten({"a": 1, "b": {"c": 2.5, "d": list(range(9))}, "e": [1, 2]}) == [
        ("a", 1), ("b.c", 2.5), ("b.d", "9 values"), ("e", [1, 2])]


def test_every_section_a_benchmark_writes_is_in_the_performance_page():
    page = report.PERFORMANCE.read_text()
    written = set()
    for path in (ROOT / "benchmarks").glob("*.py"):
        written |= set(re.findall(r'report\.write\(\s*args,\s*f?"([\w{}.]+)"', path.read_text()))
    written = {name.replace("{args.which}", which) for name in written for which in ("demo", "wide")}
    assert {"generation", "full_depth", "compile_time", "decode_capacity", "annotate_demo", "annotate_wide",
            "convert_memory", "convert_npz_memory", "mask_decoder", "inspect_cost", "circle_attention"} <= written
    for name in written:
        assert page.count(f"<!-- begin {name} -->") == 1 and page.count(f"<!-- end {name} -->") == 1, name
