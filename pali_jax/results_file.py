"""A JSONL results file that a killed job resumes: one line per answer, appended as it is done.

Beside RESULTS.jsonl, `RESULTS.jsonl.job.json` records the job that writes it (model, dtype,
masks, generation options). A file is only appended to or rewritten when it is absent, empty, or
every line is a result line and the record matches this job: anything else (a user's file, the
results of another model or other options, a file without its record) is refused in one line
before a byte of it changes. `ResultsFile(...)` only reads and checks; the file is created (and a
torn last line cut) at the first `write`, so a job that fails before its first answer leaves
nothing behind.

Each line is written by one `write(2)` on a file opened for appending, then flushed to the kernel;
the file is fsynced every `FSYNC_EVERY_S` seconds and when the job ends. A kill -9 can therefore
cut at most the last line: on reopening, a last line without its newline is cut off (its item is
answered again), and every complete line names an (image, prompt) pair that the job skips. One
job writes a file at a time (an exclusive lock). When every item is answered, `finish` rewrites
the file in input order, atomically (`files.atomic_write`), reading it line by line: memory holds
one offset per line, never the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

from pali_jax.detection import Detection
from pali_jax.errors import UserError, warn_default
from pali_jax.files import atomic_write, check_output, clean_stale, write_text_atomically

FSYNC_EVERY_S = 2.0
JOB_SUFFIX = ".job.json"

Key = tuple[str, str]  # (image, prompt)


def box_record(det: Detection) -> dict:
    """A detection as JSON: its box, label and codes, and a decoded mask as COCO RLE with its pixel box."""
    from pali_jax.segmentation import mask_box, rle_encode

    record = {"xmin": det.xmin, "ymin": det.ymin, "xmax": det.xmax, "ymax": det.ymax, "label": det.label,
              "seg_codes": det.seg_codes}
    if det.mask is not None:
        record["mask"] = rle_encode(det.mask)
        record["mask_box"] = list(mask_box(det.locs, *det.mask.shape))  # x1, y1, x2, y2 (pixels)
    return record


def record_key(record: Any) -> Key | None:
    """The (image, prompt) a result line answers; None if it is no result line."""
    if isinstance(record, dict) and isinstance(record.get("image"), str) and isinstance(record.get("prompt"), str):
        return record["image"], record["prompt"]
    return None


def _lines(fd: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) of every complete line of `fd`, then the torn rest (no newline)."""
    offset, rest = 0, b""
    while chunk := os.pread(fd, 1 << 20, offset + len(rest)):
        rest += chunk
        start = 0
        while (end := rest.find(b"\n", start)) >= 0:
            yield offset + start, rest[start : end + 1]
            start = end + 1
        offset, rest = offset + start, rest[start:]
    if rest:
        yield offset, rest


def _differences(saved: Any, job: dict) -> list[str]:
    if not isinstance(saved, dict):
        return ["(not a job record)"]
    return [f"{k}: {saved.get(k)!r} -> {job.get(k)!r}" for k in sorted(set(saved) | set(job)) if saved.get(k) != job.get(k)]


class ResultsFile:
    """The results file of one job (`job`: what identifies its answers, JSON-ready; None: check
    only that the file is a results file, to fail early); `done` holds the keys of its complete
    lines. `inputs`: files the job reads, which it must not be. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, job: dict | None, *, inputs: Iterable[str | os.PathLike] = (),
                 warn: Callable[[str], None] = warn_default, flag: str = "--out"):
        self.path = Path(path)
        self.real = check_output(path, flag, inputs=inputs)  # a regular file or nothing: never opened otherwise
        self.job_file = self.real.with_name(self.real.name + JOB_SUFFIX)
        self.job = json.loads(json.dumps(job))  # as it reads back
        self._warn, self._fd, self._torn_at = warn, -1, None
        self.done: set[Key] = set()
        if self.real.exists():
            fd = os.open(self.real, os.O_RDONLY)
            try:
                self._check(fd)
            finally:
                os.close(fd)
        self._synced = time.monotonic()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse(self, why: str) -> UserError:
        return UserError(f"--out {self.path} {why}: refusing to append to or rewrite it; pick another --out")

    def _check(self, fd: int) -> None:
        """Reads the existing file: every complete line must be a result line of this job."""
        if os.fstat(fd).st_size == 0:
            return
        try:
            saved = json.loads(self.job_file.read_text())
        except FileNotFoundError:
            raise self._refuse(f"exists and has no {self.job_file.name} beside it (it is not a results file of "
                               "pali-jax annotate)") from None
        except (OSError, ValueError):
            raise self._refuse(f"has a damaged {self.job_file.name}") from None
        changed = _differences(saved, self.job) if self.job is not None else []
        if changed:
            raise UserError(f"--out {self.path} holds the answers of another job ({'; '.join(changed)}): rerun with "
                            "the same model and options to resume it, or pick another --out")
        for number, (offset, line) in enumerate(_lines(fd), start=1):
            if not line.endswith(b"\n"):
                self._torn_at = offset  # a write cut short by a kill: cut at the first write
                break
            if not line.strip():
                continue
            try:
                key = record_key(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                key = None
            if key is None:
                raise self._refuse(f"line {number} is not a result line (JSON with image and prompt)")
            self.done.add(key)

    def _open(self) -> None:
        """Creates or opens the file for appending (at the first write): records the job, takes the
        lock, cuts a torn last line."""
        if self.job is None:
            raise ValueError("a ResultsFile opened without its job record only checks")
        clean_stale(self.real)  # a killed `finish`'s temporary
        try:
            saved = json.loads(self.job_file.read_text())
        except (OSError, ValueError):
            saved = None
        if saved != self.job:
            write_text_atomically(self.job_file, json.dumps(self.job, indent=1) + "\n")
        fd = os.open(self.real, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another job is writing {self.path}") from None
        self._fd = fd
        if self._torn_at is not None:
            os.ftruncate(fd, self._torn_at)
            os.fsync(fd)
            self._warn(f"{self.path}: cut off a torn last line (an interrupted write); its image is answered again")
            self._torn_at = None

    def write(self, record: dict) -> None:
        """Appends one result line (one write call: a kill leaves the line whole or torn, never
        mixed). A failed write (disk full, I/O error) raises at once."""
        if self._fd < 0:
            self._open()
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:  # a regular file takes it whole; a short write (disk full) raises or continues here
            view = view[os.write(self._fd, view):]
        self.done.add(record_key(record))
        if time.monotonic() - self._synced >= FSYNC_EVERY_S:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def finish(self, order: Iterable[Key]) -> None:
        """Rewrites the file with its lines in the order of `order` (lines of other keys last, as
        they were), atomically, line by line. Creates the file if no answer was written."""
        if self._fd < 0:
            self._open()
        os.fsync(self._fd)
        rank = {key: i for i, key in enumerate(order)}
        places = [(rank.get(record_key(json.loads(line)), len(rank)), offset, len(line))
                  for offset, line in _lines(self._fd) if line.strip()]
        places.sort(key=lambda place: place[0])  # stable: lines of other keys keep their order
        with atomic_write(self.real) as out:
            for _, offset, length in places:
                out.write(os.pread(self._fd, length, offset))

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
