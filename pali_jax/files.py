"""The files the commands read and write: one atomic write, one check of a destination, one JSONL reader.

Every output is written into a temporary sibling `.NAME.tmp-PID` and renamed over NAME at the end
(`atomic_write` for a file, `temporary_sibling` + `clean_stale` for the model directories of
`model_dir`): a reader sees the old file or the new one, never half of one. A writer killed before
its rename leaves its temporary behind; the next write of the same destination removes every
temporary whose process is gone (`clean_stale`), so that is done in one place for every command.

`check_output` refuses, before any byte is written, destinations whose replacement would destroy
something that is not the job's: anything but a regular file (a FIFO would block, a device would be
replaced by a regular file, /dev/zero read forever), an input of the same job, and a file inside
a source. A symlink is followed: its target is what gets written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pali_jax.errors import UserError

_STALE = re.compile(r"\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)")


def temporary_sibling(dst: Path, kind: str = "tmp") -> Path:
    """`.NAME.<kind>-PID` beside `dst`: this process's temporary for it (`kind` "tmp" or "old")."""
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(dst: Path) -> list[Path]:
    """Removes the temporaries of `dst` (`.NAME.tmp-PID`, `.NAME.old-PID`, files or directories)
    whose writer process is gone; returns what it removed."""
    removed = []
    try:
        siblings = list(dst.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        m = _STALE.fullmatch(path.name)
        if m and m["name"] == dst.name and not _pid_alive(int(m["pid"])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output(path: str | os.PathLike, what: str = "output", *, inputs: Iterable[str | os.PathLike] = (),
                 sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuses `path` as a file destination unless it is absent or a regular file, in an existing
    folder, is none of `inputs` and lies inside none of `sources` (directories or files read by the
    same job). Decided from the file's type alone: nothing is opened. Returns the path written
    (a symlink's target)."""
    if not str(path).strip():
        raise UserError(f"{what}: the path is an empty string")
    path = Path(path)
    real = Path(os.path.realpath(path))
    if not real.parent.is_dir():
        raise UserError(f"{what} {path}: folder {path.parent} does not exist")
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        hint = f": give a file name such as {path / 'out'}" if stat.S_ISDIR(mode) else ": refusing to replace it"
        raise UserError(f"{what} {path} is {_kind(mode)}{hint}")
    for source in inputs:
        if mode is not None and Path(source).exists() and os.path.samefile(real, source):
            raise UserError(f"{what} {path} is also an input of this job: writing it would destroy the input")
    for source in sources:
        if _inside(real, Path(os.path.realpath(source))):
            raise UserError(f"{what} {path} lies inside the source {source}: pick a destination outside it")
    return real


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces `path` (a symlink: its target) whole when the
    block ends without an exception; on an exception `path` is left as it was. Stale temporaries
    of earlier killed writers are removed first. A failed write (disk full) raises at once."""
    real = Path(os.path.realpath(path))
    clean_stale(real)
    tmp = temporary_sibling(real)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) as the whole new content of `path`, atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text.encode())


class BadLine(UserError):
    """A JSONL line that is not JSON: `where` ("path:line") and `reason`."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def jsonl_lines(path: str | os.PathLike, what: str = "file",
                error: type[UserError] = UserError) -> Iterator[tuple[str, Any]]:
    """The non-blank lines of a JSONL file as (`"path:line"`, parsed value), read one at a time.
    A line that is not JSON yields a `BadLine` in place of the value (the caller raises it, or
    skips the line); a file that cannot be read, or is not a regular file, raises `error`."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise error(f"cannot read {what} {path}: it is {_kind(mode)}, not a JSONL file")
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadLine(where, f"not valid JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError as e:
        raise error(f"cannot read {what} {path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None


def jsonl_records(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[str, Any]]:
    """`jsonl_lines` for readers that stop at the first line that is not JSON (raised as its `BadLine`)."""
    for where, value in jsonl_lines(path, what):
        if isinstance(value, BadLine):
            raise value
        yield where, value
