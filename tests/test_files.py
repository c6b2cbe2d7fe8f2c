"""The one atomic write, the destination check and the JSONL reader (pali_jax.files)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from pali_jax.errors import UserError
from pali_jax.files import BadLine, atomic_write, check_output, clean_stale, jsonl_lines


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"new, half")
        raise RuntimeError
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f"]


def test_atomic_write_follows_a_symlink(tmp_path):
    (tmp_path / "target").write_bytes(b"old")
    (tmp_path / "link").symlink_to("target")
    with atomic_write(tmp_path / "link") as f:
        f.write(b"new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_bytes() == b"new"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".f.tmp-{dead}").write_bytes(b"x")
    (tmp_path / f".f.old-{dead}").mkdir()
    (tmp_path / f".f.tmp-{os.getpid()}-not-ours").write_bytes(b"x")  # not the pattern
    (tmp_path / f".f.tmp-{os.getppid()}").write_bytes(b"x")  # alive
    (tmp_path / f".g.tmp-{dead}").write_bytes(b"x")  # another destination's
    assert sorted(p.name for p in clean_stale(tmp_path / "f")) == sorted([f".f.tmp-{dead}", f".f.old-{dead}"])
    assert sorted(os.listdir(tmp_path)) == sorted([f".f.tmp-{os.getpid()}-not-ours", f".f.tmp-{os.getppid()}",
                                                   f".g.tmp-{dead}"])


def test_check_output_refuses_by_file_type_alone(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match="is a FIFO"):
        check_output(tmp_path / "fifo")
    with pytest.raises(UserError, match="is a folder"):
        check_output(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        check_output(tmp_path / "nowhere" / "f")
    with pytest.raises(UserError, match="empty string"):
        check_output("")
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)


def test_check_output_refuses_inputs_and_sources(tmp_path):
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to("in.jsonl")
    with pytest.raises(UserError, match="also an input"):
        check_output(tmp_path / "link", inputs=[tmp_path / "in.jsonl"])
    (tmp_path / "src").mkdir()
    with pytest.raises(UserError, match="inside the source"):
        check_output(tmp_path / "src" / "x.npz", sources=[tmp_path / "src"])
    assert check_output(tmp_path / "new", inputs=[tmp_path / "in.jsonl"]) == tmp_path.resolve() / "new"


def test_jsonl_lines_names_each_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n[2]\n')
    lines = list(jsonl_lines(path))
    assert [where for where, _ in lines] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert lines[0][1] == {"a": 1} and lines[2][1] == [2]
    assert isinstance(lines[1][1], BadLine) and str(lines[1][1]).startswith(f"{path}:3: not valid JSON")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match="is a FIFO"):
        list(jsonl_lines(tmp_path / "fifo"))
    with pytest.raises(UserError, match="not found"):
        list(jsonl_lines(tmp_path / "missing.jsonl"))
