"""pali_jax.data: the fine-tuning JSONL reader's refusals and skips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import BAD_DATA_LINES, _data_file, _line, data, images  # noqa: F401  (fixtures)

from pali_jax.data import read_jsonl
from pali_jax.errors import UserError


@pytest.mark.parametrize("case", sorted(BAD_DATA_LINES))
def test_skip_bad_lines_skips_each_kind(data, case):
    line, message = BAD_DATA_LINES[case]
    train = _data_file(data, line, f"skip-{abs(hash(case))}.jsonl")
    warnings: list[str] = []
    examples = read_jsonl(train, skip_bad=True, warn=warnings.append)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "2", "4"]
    assert len(warnings) == 1 and f"{train}:3: " in warnings[0] and message in warnings[0]


def test_outside_paths_need_the_allow_flag(data):
    train = data / "sub" / "outside.jsonl"
    train.write_text(_line(image="../good.png") + "\n")
    with pytest.raises(UserError, match="--allow-outside-paths"):
        read_jsonl(train)
    [example] = read_jsonl(train, allow_outside=True)
    assert Path(example.image).resolve() == (data / "good.png").resolve()
    inside = data / "inside.jsonl"
    inside.write_text(_line(image="sub/inside.png") + "\n")
    assert len(read_jsonl(inside)) == 1
