"""A minimal safetensors reader: the header, then any rows of any tensor, with plain file reads.

Plain reads (not mmap) keep peak memory at the output plus what is being read: mapped pages would
stay resident and count against the process. bfloat16 comes back as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from pali_jax.weights.plan import WeightError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file (no data read): a `weights.plan.Tensor`."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop of the leading axis (the whole tensor by default; a scalar is read whole)."""
        if not self.shape:
            return self._read_bytes(self.start, self.nbytes).reshape(())
        stop = self.shape[0] if stop is None else stop
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return self._read_bytes(self.start + start * row, (stop - start) * row).reshape((stop - start, *self.shape[1:]))

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """The tensor in consecutive blocks of `rows` rows of its leading axis."""
        if not self.shape:
            yield self.read()
            return
        for start in range(0, self.shape[0], rows):
            yield self.read(start, min(start + rows, self.shape[0]))

    def _read_bytes(self, offset: int, n: int) -> np.ndarray:
        out = np.empty(n // self.dtype.itemsize, self.dtype)
        with open(self.file, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(out.view(np.uint8))) != n:
                raise WeightError(f"{self.file}: truncated while reading a tensor")
        return out


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a file declares; checks that every one lies inside the file."""
    if not path.is_file():
        raise WeightError(f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightError(f"{path}: truncated (no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise WeightError(f"{path}: truncated or corrupt (header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightError(f"{path}: corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise WeightError(f"{path}: corrupt header (not a JSON object)")
    base = 8 + header_len
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[meta["dtype"]])
            begin, end = meta["data_offsets"]
            shape = tuple(int(n) for n in meta["shape"])
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise WeightError(f"{path}: corrupt entry for tensor {name!r}") from None
        if begin < 0 or end < begin or any(n < 0 for n in shape):
            raise WeightError(f"{path}: corrupt entry for tensor {name!r} (offsets {begin}..{end}, shape {shape})")
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise WeightError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        if base + end > size:
            raise WeightError(f"{path}: truncated (tensor {name!r} ends past the end of the file)")
        infos[name] = TensorInfo(path, dtype, shape, base + begin, end - begin)
    return infos
