"""A JSONL results file that a killed job resumes: one line per answer, appended as it is done.

Each line is written by one `write(2)` on a file opened for appending, then flushed to the kernel;
the file is fsynced every `FSYNC_EVERY_S` seconds and when the job ends. A kill -9 can therefore
cut at most the last line: on reopening, a last line without its newline is cut off (its item is
answered again), and every complete line names an (image, prompt) pair that the job skips. A
line that is not a result (not JSON, no image / prompt strings) stops the job: the file is not
one of ours, and appending to it would mix two things. One job writes a file at a time (an
exclusive lock). When every item is answered, `finish` rewrites the file in input order,
atomically (a temporary file beside it, then a rename).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from pali_jax.detection import Detection
from pali_jax.errors import UserError

FSYNC_EVERY_S = 2.0

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


class ResultsFile:
    """An open results file: `done` holds the keys of its complete lines. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, warn: Callable[[str], None]):
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"--out {self.path} is a folder: give a file name such as {self.path / 'results.jsonl'}")
        if not self.path.parent.is_dir():
            raise UserError(f"--out {self.path}: folder {self.path.parent} does not exist")
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(f"another job is writing {self.path}") from None
        self.done: set[Key] = self._read(warn)
        self._synced = time.monotonic()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, warn: Callable[[str], None]) -> set[Key]:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a write cut short by a kill: the item is answered again
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            warn(f"{self.path}: cut off a torn last line (an interrupted write); its image is answered again")
        done = set()
        for number, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                key = record_key(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                key = None
            if key is None:
                raise UserError(f"{self.path}:{number}: not a result line (JSON with image and prompt): "
                                "refusing to append to a file this job did not write; pick another --out")
            done.add(key)
        return done

    def write(self, record: dict) -> None:
        """Appends one result line (one write call: a kill leaves the line whole or torn, never mixed)."""
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
        they were), atomically."""
        os.fsync(self._fd)
        rank = {key: i for i, key in enumerate(order)}
        lines = [line for line in self.path.read_bytes().splitlines(keepends=True) if line.strip()]
        lines.sort(key=lambda line: rank.get(record_key(json.loads(line)), len(rank)))
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
