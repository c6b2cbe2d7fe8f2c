"""A checked `Plan`'s data: into host arrays, or straight onto a mesh's shards.

Both read one tensor at a time, and a tensor whose layout keeps its rows in front (`Piece.keeps_rows`:
embeddings, norms, big_vision's stacked arrays) a block of rows at a time, so that memory peaks
at the output plus one block (plus one whole tensor for those a transpose moves). Every value is
checked finite as it is written, whatever the source: a checkpoint holding NaN or infinity would
load and give NaN logits. `_parts` is the one per-tensor step both take (read, re-layout).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from pali_jax.generation_config import free_memory
from pali_jax.paligemma import nest
from pali_jax.sharding import _canonical, partition_spec
from pali_jax.weights.plan import Piece, Plan, WeightError

# Rows of a tensor read (and placed) at once: about this many bytes. Assign to change it for a
# whole process (the tests do, to cut tiny tensors into several blocks).
BLOCK_BYTES = 64 << 20


def _rows_per_block(piece: Piece) -> int:
    shape = piece.tensor.shape
    if not shape:
        return 1
    if not piece.keeps_rows:
        return max(shape[0], 1)  # whole: the transform needs every row
    row = math.prod(shape[1:]) * piece.tensor.dtype.itemsize
    return max(1, BLOCK_BYTES // max(row, 1))


def _parts(piece: Piece, rows: int, span: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, a block in our layout) of a piece's tensor: all of it `rows` rows at a time, or
    only rows span[0]..span[1]."""
    tensor = piece.tensor
    blocks = tensor.blocks(rows) if span is None else iter([tensor.read(*span)])
    start = 0 if span is None else span[0]
    for block in blocks:
        yield start, piece.transform(block)
        start += len(block) if block.ndim else 1


def check_finite(piece: Piece, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise WeightError(f"{piece.name} holds NaN or infinite values: the checkpoint is damaged")


def to_host(plan: Plan) -> dict[str, Any]:
    """The parameters as a nested dict of numpy arrays of `plan.dtype`. Refused up front if they
    would not fit the host's available memory."""
    need = sum(math.prod(leaf.shape) for leaf in plan.leaves.values()) * plan.dtype.itemsize
    free, where = free_memory(jax.devices("cpu")[0])
    if need > free:
        raise WeightError(f"the model needs {need / 2**30:.1f} GiB in {plan.dtype}, more than the {free / 2**30:.1f} "
                          f"GiB of {where}: load it in bfloat16 or onto a mesh")
    arrays = {path: np.empty(leaf.shape, plan.dtype) for path, leaf in plan.leaves.items()}
    for piece in plan.pieces:
        out = arrays[piece.path][piece.index]
        for start, part in _parts(piece, _rows_per_block(piece)):
            view = out[start : start + len(part)] if piece.keeps_rows and part.ndim else out
            view[...] = part
            check_finite(piece, view)  # as written: a float64 value too large for the dtype is infinite
    return nest(arrays)


def to_mesh(plan: Plan, mesh: Mesh, min_elements: int | None = None) -> dict[str, Any]:
    """The parameters as global arrays on `mesh`, each split by `sharding.partition_spec`.

    A piece that fills a whole leaf is placed shard by shard; a part (a layer, one of k/v or
    gate/up, a block of rows) is placed likewise and written into its leaf, which lives only on
    the devices (zeros, sharded, updated in place). Where a leaf's rows are split over the mesh,
    each process reads only the rows its own devices hold; it copies only its devices' slices
    of everything else. So no host holds more than one tensor (or block) at a time.
    """
    arrays: dict[tuple[str, ...], jax.Array] = {}
    writers: dict[tuple[str, ...], Any] = {}
    for piece in plan.pieces:
        leaf = plan.leaves[piece.path]
        spec = tuple(partition_spec("/".join(piece.path), leaf.shape, mesh, min_elements))
        spec += (None,) * (len(leaf.shape) - len(spec))
        ints = piece.ints()
        row_axis = next(axis for axis in range(len(leaf.shape)) if axis not in ints)  # the part's first axis
        # The part's box in the leaf: size 1 on the indexed axes (which the rules never split), so
        # that it keeps the leaf's layout and writing it moves no data between devices.
        box = [1 if axis in ints else n for axis, n in enumerate(leaf.shape)]
        split_rows = piece.keeps_rows and spec[row_axis] is not None
        if split_rows:  # one box of every row; this process reads the rows its devices hold
            held = NamedSharding(mesh, _box_spec(spec, box, leaf.shape)).addressable_devices_indices_map(tuple(box))
            rows = [index[row_axis].indices(box[row_axis])[:2] for index in held.values()]
            span = (min(r[0] for r in rows), max(r[1] for r in rows))
            parts = _parts(piece, box[row_axis], None if span == (0, box[row_axis]) else span)
        else:  # a box per block of rows (one block if the rows cannot be read apart)
            parts = _parts(piece, _rows_per_block(piece))
        for start, part in parts:
            value = np.expand_dims(np.asarray(part, plan.dtype), ints)
            check_finite(piece, value)
            if not split_rows:
                box[row_axis] = value.shape[row_axis]
            first = np.array([piece.index[a] if a in ints else 0 for a in range(len(box))], np.int32)
            first[row_axis] = 0 if split_rows else start
            placed = _place(mesh, value, box, spec, leaf.shape, row_axis, start if split_rows else 0)
            if tuple(box) == leaf.shape:
                arrays[piece.path] = placed
                continue
            if piece.path not in arrays:
                sharding = NamedSharding(mesh, _canonical(spec))
                arrays[piece.path] = jax.jit(lambda s=leaf.shape: jnp.zeros(s, plan.dtype), out_shardings=sharding)()
                writers[piece.path] = jax.jit(_update_slice, donate_argnums=0, out_shardings=sharding)
            arrays[piece.path] = writers[piece.path](arrays[piece.path], placed, first)
    return nest(arrays)


def _box_spec(spec: tuple, box: list[int], leaf_shape: tuple[int, ...]):
    """The leaf's PartitionSpec on the axes the box spans whole; None (whole on every device) elsewhere."""
    return _canonical([s if n == leaf_shape[axis] else None for axis, (s, n) in enumerate(zip(spec, box))])


def _place(mesh: Mesh, value: np.ndarray, box: list[int], spec: tuple, leaf_shape: tuple[int, ...], row_axis: int,
           shift: int) -> jax.Array:
    """`value` as a global array of shape `box`, each device getting its slice; `value` holds the
    box's rows from `shift` on (those this process's devices hold)."""

    def fetch(index: tuple[slice, ...]) -> np.ndarray:
        index = list(index)
        lo, hi, step = index[row_axis].indices(box[row_axis])
        index[row_axis] = slice(lo - shift, hi - shift, step)
        return value[tuple(index)]

    return jax.make_array_from_callback(tuple(box), NamedSharding(mesh, _box_spec(spec, box, leaf_shape)), fetch)


def _update_slice(buffer: jax.Array, value: jax.Array, start: jax.Array) -> jax.Array:
    """buffer with `value` (same rank) written at `start`."""
    return jax.lax.dynamic_update_slice(buffer, value, tuple(start))
