"""Orbax save / restore of parameter trees and of training states."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from pali_jax.errors import UserError
from pali_jax.distributed import same_on_every_process


class CheckpointError(UserError):
    """A checkpoint (parameters or training state) that is incomplete or cannot be used for this run."""


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Mutes absl's warnings while orbax writes: every plain (non-OCDBT) save logs "Skipping merge
    of OCDBT checkpoints", which is orbax talking to itself and alarms users."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Holds a Ctrl-C back until the orbax write inside has finished, then raises it.

    Interrupted halfway, orbax abandons writes that tensorstore then completes in the background:
    they land in the directory the caller's cleanup has just removed, and each reports itself
    into orbax's closed event loop (a traceback apiece). Held back, the write ends, the caller's
    cleanup removes a complete temporary directory, and the process ends in one line. A second
    Ctrl-C leaves at once (its temporary directory is then removed by the next write to the same
    place, see `files.clean_stale`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):  # noqa: ARG001
        if pending:
            os.write(2, b"error: interrupted\n")
            os._exit(130)
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turns tensorstore's write failures (raised by orbax as ValueError: a full disk, a file size
    limit, a read-only folder) into one-line errors; other ValueErrors are bugs and propagate."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        if "os_error_code" not in text and "Error writing" not in text and "Error opening" not in text:
            raise
        m = re.search(r":\s*([^:\[\]\"]+?)\s*\[os_error_code", text)
        reason = m[1] if m else " ".join(text.split())[:160]
        raise CheckpointError(f"cannot write {path}: {reason} (is the disk full?)") from None


def save_params(path: str | Path, params: Any) -> None:
    """Writes a parameter tree (numpy or jax arrays) as an orbax checkpoint at `path` (must not exist).

    Synchronous and lean, for the converter's peak memory: orbax's defaults deep-copy every numpy
    array before writing (this save finishes before returning, so no copy is needed), compress the
    chunks (float weights hardly compress) and pack them into an OCDBT store, which buffers about
    40% of a 3B model on the way. Plain zarr arrays cost nothing beyond the parameters.

    In a multi-process run only process 0 calls it (orbax writes host arrays from process 0 only),
    and it writes alone: no barrier waits for the other processes.
    """
    if jax.process_index() != 0:
        raise ValueError(f"save_params runs on process 0 only; this is process {jax.process_index()}")
    alone = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(
        type_handler_registry=registry, use_compression=False, use_ocdbt=False, multiprocessing_options=alone
    )
    with _deferred_interrupt(), _write_errors(Path(path)), _quiet_orbax(), \
            ocp.Checkpointer(handler, multiprocessing_options=alone) as ckptr:
        ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(params))


def restore_params(path: str | Path, abstract: Any = None) -> Any:
    """Reads a parameter tree; `abstract` (a tree of `jax.ShapeDtypeStruct`, with shardings if
    wanted) sets each leaf's dtype and placement. None restores as saved."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), abstract)


def stored_dtypes(params_dir: str | Path, abstract: Any) -> Any:
    """`abstract` with each leaf's dtype as stored (so reading maps the files, casting nothing)."""
    params_dir = Path(params_dir)

    def stored(keys, leaf):
        meta = params_dir / ".".join(str(k.key) for k in keys) / ".zarray"
        try:
            name = json.loads(meta.read_text())["dtype"]
            dtype = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
        except (OSError, KeyError, TypeError, ValueError):
            dtype = leaf.dtype
        return jax.ShapeDtypeStruct(leaf.shape, dtype)

    return jax.tree_util.tree_map_with_path(stored, abstract)


def read_params(path: str | Path, abstract: Any) -> Any:
    """`restore_params` as host arrays that `jax.device_put` makes device arrays without a copy on CPU,
    for checkpoints `save_params` wrote from host arrays.

    Those hold each array as one raw zarr chunk (no compression, no OCDBT). An array kept in its
    stored dtype is the file itself, memory-mapped read-only (pages come from the page cache as
    they are first used, and slices along the leading axis are views); one cast to another dtype
    is read into a 64-byte-aligned buffer (what XLA:CPU needs to use host memory in place). So
    loading copies nothing it need not, and memory peaks at the parameters' size; orbax's restore
    reads through a second buffer (about 2x the parameters at its peak), and its numpy arrays are
    unaligned, so every jitted call would copy them again. Any other layout goes through orbax.
    The files must not be rewritten in place while mapped (the converter replaces a directory
    whole, which is safe).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing: the model directory has no parameters")
    keyed, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    files = [_single_chunk(path, keys, leaf) for keys, leaf in keyed]
    try:
        zarr3 = json.loads((path / "_METADATA").read_text()).get("use_zarr3")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"{path}/_METADATA is missing or damaged: not a complete orbax checkpoint") from None
    if None in files or zarr3:
        try:
            return restore_params(path, abstract)
        except (ValueError, KeyError, TypeError, OSError, FileNotFoundError) as e:
            reason = " ".join(str(e).split())[:200]
            raise CheckpointError(f"cannot restore the parameters in {path}: {reason}") from None
    return jax.tree.unflatten(treedef, [_read_chunk(*f, leaf) for f, (_, leaf) in zip(files, keyed)])


def _single_chunk(path: Path, keys, leaf) -> tuple[Path, np.dtype] | None:
    """(chunk file, stored dtype) of a leaf saved as one uncompressed C-order zarr v2 chunk; else None."""
    array_dir = path / ".".join(str(k.key) for k in keys)
    try:
        meta = json.loads((array_dir / ".zarray").read_text())
        dtype = np.dtype(ml_dtypes.bfloat16 if meta["dtype"] == "bfloat16" else meta["dtype"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    if tuple(meta.get("shape", ())) != tuple(leaf.shape):  # orbax would restore it as stored, whatever was asked
        raise CheckpointError(f"{array_dir.name} is stored with shape {tuple(meta.get('shape', ()))}, the config's "
                              f"model needs {tuple(leaf.shape)}: the config does not belong to these parameters")
    plain = meta.get("compressor") is None and not meta.get("filters") and meta.get("order") == "C"
    if not plain or meta.get("zarr_format") != 2:
        return None
    if meta.get("chunks") != meta["shape"] or not dtype.isnative:
        return None
    chunk = array_dir / meta.get("dimension_separator", ".").join(["0"] * max(len(leaf.shape), 1))
    # A plain array whose chunk is gone or cut short must not reach orbax: zarr reads a missing
    # chunk as the fill value, so the model would load with zeros for weights.
    if not chunk.is_file():
        raise CheckpointError(f"{chunk} is missing: the checkpoint is incomplete")
    if chunk.stat().st_size != leaf.size * dtype.itemsize:
        raise CheckpointError(f"{chunk} has {chunk.stat().st_size} bytes, {leaf.size * dtype.itemsize} expected: "
                              "the checkpoint is truncated")
    return chunk, dtype


def _read_chunk(chunk: Path, stored: np.dtype, leaf) -> np.ndarray:
    """The array in `chunk` (stored dtype) in the leaf's dtype: the mapped file, or a cast copy."""
    mapped = np.memmap(chunk, dtype=stored, mode="r", shape=leaf.shape)  # page-aligned
    if stored == np.dtype(leaf.dtype):
        return mapped
    cast = _aligned_empty(leaf.shape, leaf.dtype)
    np.copyto(cast, mapped, casting="unsafe")
    return cast


def _aligned_empty(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary (what XLA:CPU
    needs to use host memory in place)."""
    dtype = np.dtype(dtype)
    raw = np.empty(math.prod(shape) * dtype.itemsize + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


class TrainCheckpointer:
    """Training-state checkpoints in `directory/<step>/`: one every `every` steps (and whenever
    `save(..., force=True)`), the newest `keep` kept.

    The state is any pytree of arrays (`pali_jax.train.TrainState`: params, optimizer state, step,
    RNG); saves are synchronous, so the caller may donate the state's buffers right after.

    Multi-host: every process constructs it and calls `save`, `latest_step` and `restore` in the
    same order, on a directory they all share. orbax makes these collective: each process writes
    and reads only its own devices' shards, process 0 writes the metadata, commits each step
    (rename after a barrier) and deletes old ones.
    """

    def __init__(self, directory: str | Path, every: int, keep: int = 3):
        if every <= 0 or keep <= 0:
            raise CheckpointError(f"checkpoint interval and keep must be positive, got {every} and {keep}")
        # The interval is applied here: orbax would also save the first step it is given.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.every = every
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves `state` as step `step` when `step` is a multiple of `every` (or `force`); True if saved."""
        if not (force or step % self.every == 0) or step in self._manager.all_steps():
            return False
        with _deferred_interrupt(), _write_errors(self.directory / str(step)), _quiet_orbax():
            return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def latest_step(self) -> int | None:
        """The newest saved step (None: no checkpoint), checked to be the one every process sees."""
        step = self._manager.latest_step()
        if not same_on_every_process(-1 if step is None else step):
            raise CheckpointError(f"the processes see different checkpoints in {self.directory}: "
                                  "it must be a directory every host shares")
        return step

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """The state saved at `step` (default: the latest), shaped like `abstract_state` (see
        `Trainer.abstract_state`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError, TypeError) as e:
            reason = " ".join(str(e).split())[:300]
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit this run (other model or trainable set?): {reason}"
            ) from None

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
