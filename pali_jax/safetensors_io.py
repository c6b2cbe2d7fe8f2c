"""A minimal safetensors reader that loads one tensor at a time with plain file reads.

Plain reads (not mmap) keep peak memory at the output plus one tensor: mapped pages would stay
resident and count against the process. bfloat16 comes back as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from pali_jax.errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsError(UserError):
    """A safetensors file that cannot be read (truncated, corrupt, unknown dtype)."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a file declares; checks that every one lies inside the file."""
    if not path.is_file():
        raise SafetensorsError(f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: truncated (no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise SafetensorsError(f"{path}: truncated or corrupt (header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{path}: corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt header (not a JSON object)")
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
            raise SafetensorsError(f"{path}: corrupt entry for tensor {name!r}") from None
        if begin < 0 or end < begin or any(n < 0 for n in shape):
            raise SafetensorsError(f"{path}: corrupt entry for tensor {name!r} (offsets {begin}..{end}, shape {shape})")
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        if base + end > size:
            raise SafetensorsError(f"{path}: truncated (tensor {name!r} ends past the end of the file)")
        infos[name] = TensorInfo(path, dtype, shape, base + begin, end - begin)
    return infos


_CHUNK_BYTES = 64 << 20


def read_tensor(info: TensorInfo) -> np.ndarray:
    out = np.empty(info.shape, info.dtype)
    read_into(info, out)
    return out


def read_into(info: TensorInfo, out: np.ndarray) -> None:
    """Reads a tensor straight into `out` (C-contiguous, same shape), casting to out's dtype in
    chunks: no full-size temporary, so big tensors (the 257k-row embedding) cost no extra memory."""
    if out.shape != info.shape or not out.flags.c_contiguous:
        raise ValueError(f"read_into needs a C-contiguous {info.shape} array, got {out.shape}")
    flat = out.reshape(-1)
    step = max(1, _CHUNK_BYTES // info.dtype.itemsize)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        for start in range(0, flat.size, step):
            part = flat[start : start + step]
            if out.dtype == info.dtype:
                got = f.readinto(memoryview(part.view(np.uint8)))
                want = part.nbytes
            else:
                raw = f.read(part.size * info.dtype.itemsize)
                got, want = len(raw), part.size * info.dtype.itemsize
                if got == want:
                    part[...] = np.frombuffer(raw, info.dtype)
            if got != want:
                raise SafetensorsError(f"{info.file}: truncated while reading a tensor")
