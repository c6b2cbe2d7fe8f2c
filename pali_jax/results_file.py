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

A job split over machines (`pali-jax annotate --shard K/N`, each writing its own results file whose
record names its shard) is put back together by `merge_shards`: every shard of one job present
once and complete, their lines copied byte for byte in input order into one file with the
unsharded job's record, which is then the file one unsharded run gives.
"""

from __future__ import annotations

import contextlib
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


def shard_of(spec: str) -> tuple[int, int]:
    """"K/N" as (K, N) with 0 <= K < N; a one-line `UserError` otherwise."""
    k, slash, n = spec.partition("/")
    if not (slash and k.strip().isdigit() and n.strip().isdigit()):
        raise UserError(f"--shard {spec}: expected K/N, e.g. 0/4 (this process answers the K-th of N shares)")
    k, n = int(k), int(n)
    if n < 1 or k >= n:
        raise UserError(f"--shard {spec}: K must be in [0, N) and N >= 1")
    return k, n


def shard_share(count: int, shard: tuple[int, int]) -> range:
    """The input positions shard (K, N) answers: every N-th from the K-th (prompts and image
    sizes spread evenly whatever the input's order)."""
    k, n = shard
    return range(k, count, n)


def merge_shards(out: str | os.PathLike, shards: Iterable[str | os.PathLike], order: list[Key], *,
                 inputs: Iterable[str | os.PathLike] = ()) -> int:
    """Writes the results files of a job's shards as one file `out` in the order of `order` (the
    job's inputs), with the unsharded job's record; returns the lines written. Every check runs
    before anything is written: each file is a shard's results file (its record names the shard),
    the shards are one job's, each of 0..N-1 once, and each holds exactly its share of `order`."""
    shards = [Path(p) for p in shards]
    records: dict[tuple[int, int], tuple[Path, dict]] = {}
    for path in shards:
        if not path.is_file():
            raise UserError(f"--merge {path}: no such results file")
        try:
            job = json.loads(path.with_name(path.name + JOB_SUFFIX).read_text())
        except (OSError, ValueError):
            raise UserError(f"--merge {path}: no readable {path.name + JOB_SUFFIX} beside it: not the results "
                            "file of a pali-jax annotate --shard run") from None
        shard = job.get("shard") if isinstance(job, dict) else None
        if not (isinstance(shard, list) and len(shard) == 2 and all(type(v) is int for v in shard)
                and 0 <= shard[0] < shard[1]):
            raise UserError(f"--merge {path}: not the results of a --shard run (its record names no shard)")
        if tuple(shard) in records:
            raise UserError(f"--merge {path}: shard {shard[0]}/{shard[1]} is given twice")
        records[tuple(shard)] = (path, {k: v for k, v in job.items() if k != "shard"})
    n = {n for _, n in records}
    if len(n) != 1:
        raise UserError(f"--merge: the files are shards of different splits ({', '.join(f'/{m}' for m in sorted(n))})")
    n = n.pop()
    missing = [k for k in range(n) if (k, n) not in records]
    if missing:
        raise UserError(f"--merge: shard{'s' * (len(missing) > 1)} {', '.join(f'{k}/{n}' for k in missing)} "
                        "missing")
    (_, first), *rest = [records[k, n] for k in range(n)]
    for path, job in rest:
        changed = _differences(first, job)
        if changed:
            raise UserError(f"--merge {path}: another job's shard ({'; '.join(changed)})")
    lines: dict[Key, tuple[Path, int, int]] = {}
    for k in range(n):
        path = records[k, n][0]
        want = {order[i] for i in shard_share(len(order), (k, n))}
        with open(path, "rb") as f:
            got = []
            for offset, line in _lines(f.fileno()):
                if not line.endswith(b"\n"):
                    raise UserError(f"--merge {path}: its last line is torn (the run was killed): resume it first")
                try:
                    key = record_key(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    key = None
                if key is None:
                    raise UserError(f"--merge {path}: a line is not a result line")
                got.append(key)
                lines[key] = (path, offset, len(line))
        if set(got) != want or len(got) != len(want):
            raise UserError(f"--merge {path}: shard {k}/{n} is incomplete or holds other inputs ({len(set(got) & want)} "
                            f"of its {len(want)} inputs answered, {len(set(got) - want)} foreign, "
                            f"{len(got) - len(set(got))} twice): finish or resume it first")
    real = check_output(out, "--out", inputs=[*shards, *inputs])
    if real.exists() and real.stat().st_size:
        raise UserError(f"--out {out} exists and is not empty: pick another --out")
    write_text_atomically(real.with_name(real.name + JOB_SUFFIX), json.dumps(first, indent=1) + "\n")
    with contextlib.ExitStack() as stack, atomic_write(real) as dst:
        fds = {path: stack.enter_context(open(path, "rb")).fileno() for path, _ in records.values()}
        for key in order:
            path, offset, length = lines[key]
            dst.write(os.pread(fds[path], length, offset))
    return len(order)
