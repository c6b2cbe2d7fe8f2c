"""An `.npz` read one array at a time, from its `.npy` headers first (np.load cannot memory-map an npz).

Each member's header is checked against the member's real size before anything is allocated by
it (a header claiming shape (100000000, 256) in a file of a few kilobytes is refused, not
allocated). Whole members are streamed through the zip reader, which checks their CRC-32; a
damaged member is one error line. bfloat16, which numpy saves as 2-byte `void`, is recovered.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from pali_jax.weights.plan import BFLOAT16, WeightError

# What the zip reader raises for a damaged entry (a bad CRC, a broken deflate stream, a short file).
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


@dataclasses.dataclass(frozen=True)
class Member:
    """One array of an `.npz`: its zip entry and `.npy` header (no data read); a `weights.plan.Tensor`."""

    path: Path
    entry: str  # the zip entry, "<name>.npy"
    name: str  # the array's key, any prefix the caller strips removed
    shape: tuple[int, ...]
    dtype: np.dtype  # as stored (bfloat16 already recovered from void)
    fortran_order: bool
    offset: int = 0  # where the data starts in the entry (after the .npy header)

    @contextmanager
    def _data(self) -> Iterator[IO[bytes]]:
        """The entry's stream at the start of its data; any damage found reading it is one WeightError."""
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.entry) as f:
                f.seek(self.offset)
                yield f
        except _DAMAGE as e:
            raise WeightError(f"{self.path}: member {self.entry} is damaged ({' '.join(str(e).split())})") from None

    def _rows(self, f: IO[bytes], n: int) -> np.ndarray:
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        buf = bytearray(n * row)
        if f.readinto(memoryview(buf)) != len(buf):
            raise WeightError(f"{self.path}: member {self.entry} is truncated")
        return np.frombuffer(buf, self.dtype).reshape((n, *self.shape[1:]))

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """The array in consecutive blocks of `rows` rows of its leading axis, read to the member's
        end (so the zip reader checks its CRC). A Fortran-ordered array or a scalar comes whole."""
        with self._data() as f:
            if self.fortran_order or not self.shape:
                raw = f.read(math.prod(self.shape) * self.dtype.itemsize)
                if len(raw) != math.prod(self.shape) * self.dtype.itemsize:
                    raise WeightError(f"{self.path}: member {self.entry} is truncated")
                yield np.frombuffer(raw, self.dtype).reshape(self.shape, order="F" if self.fortran_order else "C")
                f.read(1)  # the member's end: the zip reader checks the CRC there
                return
            for start in range(0, self.shape[0], rows):
                yield self._rows(f, min(rows, self.shape[0] - start))
            f.read(1)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop only (no CRC check: the member is not read whole)."""
        if self.fortran_order or not self.shape:
            return next(self.blocks(1))[start:stop]
        with self._data() as f:
            f.seek(self.offset + start * math.prod(self.shape[1:]) * self.dtype.itemsize)
            return self._rows(f, stop - start)


def _stored_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
        return BFLOAT16  # how numpy saves bfloat16: as 2-byte void
    return dtype


def read_members(path: str | os.PathLike, prefixes: tuple[str, ...] = ()) -> dict[str, Member]:
    """The arrays of an `.npz` by key (a leading `prefixes` entry removed), from the headers alone."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise WeightError(f"{path} does not exist") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightError(f"{path} is not an .npz file ({' '.join(str(e).split())})") from None
    members: dict[str, Member] = {}
    with zf:
        for info in zf.infolist():
            entry = info.filename
            if not entry.endswith(".npy"):
                raise WeightError(f"{path}: member {entry!r} is not a .npy array")
            try:
                with zf.open(entry) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
            except (*_DAMAGE, ValueError) as e:  # ValueError: a malformed .npy header
                raise WeightError(f"{path}: member {entry!r} is not a readable .npy ({' '.join(str(e).split())})") from None
            shape, dtype = tuple(shape), _stored_dtype(dtype)
            declared = math.prod(shape) * dtype.itemsize
            if not dtype.hasobject and declared != info.file_size - offset:  # objects are pickled: any size
                raise WeightError(f"{path}: member {entry!r} is damaged: its header says {shape} {dtype} "
                                  f"({declared} bytes), it holds {info.file_size - offset} bytes")
            key = entry[: -len(".npy")]
            name = next((key[len(p):] for p in prefixes if key.startswith(p)), key)
            if name in members:
                raise WeightError(f"{path}: {name!r} appears twice (with and without {prefixes[0]})")
            members[name] = Member(path, entry, name, shape, dtype, fortran, offset)
    if not members:
        raise WeightError(f"{path} holds no arrays")
    return members
