"""The results file of a resumable job: it appends to, cuts or rewrites only its own job's results."""

from __future__ import annotations

import json

import pytest

from pali_jax.errors import UserError
from pali_jax.results_file import ResultsFile

JOB = {"model": "/m", "max_new_tokens": 8}


def _line(image: str) -> str:
    return json.dumps({"image": image, "prompt": "caption en", "text": image}) + "\n"


def _job_file(out, job=JOB):
    out.with_name(out.name + ".job.json").write_text(json.dumps(job))


def test_nothing_is_created_before_the_first_write(tmp_path):
    with ResultsFile(tmp_path / "out.jsonl", JOB) as results:
        assert results.done == set() and list(tmp_path.iterdir()) == []
        results.write({"image": "a", "prompt": "p"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.job.json"]
    assert json.loads((tmp_path / "out.jsonl.job.json").read_text()) == JOB


def test_a_torn_line_is_cut_only_in_this_jobs_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(_line("a") + _line("b")[:10])
    _job_file(out)
    warnings = []
    with ResultsFile(out, JOB, warn=warnings.append) as results:
        assert results.done == {("a", "caption en")} and out.read_text().endswith(_line("b")[:10])  # not yet
        results.write(json.loads(_line("c")))
    assert out.read_text() == _line("a") + _line("c") and "torn last line" in warnings[0]


@pytest.mark.parametrize("content, job, message", [
    (_line("a") + "not json\n" + _line("b")[:5], JOB, "line 2 is not a result line"),
    (_line("a") + _line("b")[:5], None, "has no out.jsonl.job.json beside it"),
    (_line("a"), {**JOB, "max_new_tokens": 9}, "another job (max_new_tokens: 9 -> 8)"),
    (_line("a"), [], "another job"),
])
def test_a_file_of_another_job_is_refused_untouched(tmp_path, content, job, message):
    out = tmp_path / "out.jsonl"
    out.write_text(content)
    if job is not None:
        _job_file(out, job)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ResultsFile(out, JOB)
    assert out.read_text() == content


def test_finish_puts_lines_in_input_order(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultsFile(out, JOB) as results:
        for image in "cab":
            results.write(json.loads(_line(image)))
        results.write({"image": "z", "prompt": "other"})
        results.finish([("a", "caption en"), ("b", "caption en"), ("c", "caption en")])
    assert out.read_text().splitlines(keepends=True)[:3] == [_line("a"), _line("b"), _line("c")]
    assert json.loads(out.read_text().splitlines()[3])["image"] == "z"
