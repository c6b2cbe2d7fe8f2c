"""A checked `Plan`'s data: into host arrays, or straight onto a mesh's shards.

Both read one tensor at a time, and a tensor whose layout keeps its rows in front (`Piece.keeps_rows`:
embeddings, norms, big_vision's stacked arrays) a block of rows at a time, so that memory peaks
at the output plus one block (plus one whole tensor for those a transpose moves). Every value is
checked finite as it is written, whatever the source: a checkpoint holding NaN or infinity would
load and give NaN logits. `_parts` is the one per-tensor step both take (read, re-layout, and
with a `Quantization`, quantise: `quantize.py`): a quantised load never holds more than one float
tensor (or block), so memory peaks near the quantised model, never the float one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from pali_jax import quantize
from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax.generation_config import free_memory
from pali_jax.paligemma import abstract_params, nest
from pali_jax.quantize import QVALUE, SCALE, Quantization
from pali_jax.sharding import _canonical, partition_spec, scale_spec
from pali_jax.weights.plan import LeafPath, Piece, Plan, WeightError

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


def _parts(piece: Piece, rows: int, span: tuple[int, int] | None = None, quant: _Quantized | None = None,
           dtype=None) -> Iterator[tuple[int, Any]]:
    """(first row, a block in our layout) of a piece's tensor: all of it `rows` rows at a time, or
    only rows span[0]..span[1]. The block is in `dtype` (checked finite), or, where `quant` says
    the leaf is quantised, {"qvalue", "qscale"} of the block with the leaf's rank (the piece's
    indexed axes of size 1), quantised from the stored values in float32."""
    tensor = piece.tensor
    blocks = tensor.blocks(rows) if span is None else iter([tensor.read(*span)])
    start = 0 if span is None else span[0]
    for block in blocks:
        part = piece.transform(block)
        if quant is None:
            value = np.asarray(part, dtype)
            check_finite(piece, value)  # as written: a float64 value too large for the dtype is infinite
        else:
            value = np.expand_dims(np.asarray(part, np.float32), piece.ints())
            check_finite(piece, value)
            node = quantize.quantize(value, quant.how, quant.contracted, piece.name)
            value = {k: np.asarray(v) for k, v in node.items()}
        yield start, value
        start += len(block) if block.ndim else 1


@dataclasses.dataclass(frozen=True)
class _Quantized:
    """How one leaf is quantised: its quantised shapes and the axes its scales reduce."""

    how: Quantization
    contracted: tuple[int, ...]
    qvalue: jax.ShapeDtypeStruct
    qscale: jax.ShapeDtypeStruct


def quantized_leaves(plan: Plan, quant: Quantization | None) -> dict[LeafPath, _Quantized]:
    """{leaf path: how it is quantised} of the plan's leaves that `quant` quantises (none for None).
    The plan's leaves are in the checkpoint layout; so is the quantised tree read here."""
    if quant is None:
        return {}
    flat = jax.tree_util.tree_flatten_with_path(
        abstract_params(plan.config, layout=dataclasses.replace(CHECKPOINT_LAYOUT, quant=quant))
    )[0]
    shapes = {tuple(k.key for k in p): leaf for p, leaf in flat}
    out = {}
    for path in plan.leaves:
        qvalue, qscale = shapes.get((*path, QVALUE)), shapes.get((*path, SCALE))
        if qvalue is None:
            continue
        contracted = quantize.contracted_axes(qvalue.shape, qscale.shape)
        scheme = "int4" if jnp.dtype(qvalue.dtype) == jnp.dtype(jnp.int4) else "int8"
        group = quantize._group_of(qvalue.shape, qscale.shape, contracted)
        out[path] = _Quantized(Quantization(scheme, group), contracted, qvalue, qscale)
    return out


def _whole(piece: Piece, q: "_Quantized | None") -> Piece:
    """The piece, read whole where it is quantised along its rows (a block of rows would hold part
    of each scale's inputs): big_vision's unstacked kernels [in, out]."""
    if q is None or not piece.keeps_rows:
        return piece
    row_axis = next(axis for axis in range(len(q.qvalue.shape)) if axis not in piece.ints())
    return dataclasses.replace(piece, keeps_rows=False) if row_axis in q.contracted else piece


def check_finite(piece: Piece, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise WeightError(f"{piece.name} holds NaN or infinite values: the checkpoint is damaged")


def to_host(plan: Plan, quant: Quantization | None = None) -> dict[str, Any]:
    """The parameters as a nested dict of numpy arrays of `plan.dtype`, the weights `quant`
    quantises as {"qvalue", "qscale"} (quantised tensor by tensor). Refused up front if they would
    not fit the host's available memory."""
    quantized = quantized_leaves(plan, quant)
    shapes: dict[LeafPath, tuple[tuple[int, ...], Any]] = {}
    for path, leaf in plan.leaves.items():
        q = quantized.get(path)
        if q is None:
            shapes[path] = (leaf.shape, plan.dtype)
        else:
            shapes[(*path, QVALUE)] = (q.qvalue.shape, q.qvalue.dtype)
            shapes[(*path, SCALE)] = (q.qscale.shape, q.qscale.dtype)
    need = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in shapes.values())
    free, where = free_memory(jax.devices("cpu")[0])
    if need > free:
        advice = "quantize it, load it onto a mesh" if quant is None else "load it onto a mesh"
        raise WeightError(f"the model needs {need / 2**30:.1f} GiB{'' if quant else f' in {plan.dtype}'}, more than the "
                          f"{free / 2**30:.1f} GiB of {where}: {'load it in bfloat16, ' if quant is None else ''}{advice}")
    arrays = {path: np.empty(shape, dtype) for path, (shape, dtype) in shapes.items()}
    for piece in plan.pieces:
        q = quantized.get(piece.path)
        piece = _whole(piece, q)
        # the piece's indexed axes are kept (size 1) in a quantised block, dropped in a float one
        index = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in piece.index) if q else piece.index
        row_axis = next(a for a in range(len(q.qvalue.shape)) if a not in piece.ints()) if q else 0
        for start, part in _parts(piece, _rows_per_block(piece), quant=q, dtype=plan.dtype):
            targets = [(piece.path, part)] if q is None else [((*piece.path, k), v) for k, v in part.items()]
            for path, value in targets:
                out = arrays[path][index]
                if piece.keeps_rows and value.ndim:
                    out = out[(slice(None),) * row_axis + (slice(start, start + value.shape[row_axis]),)]
                out[...] = value
    return nest(arrays)


def to_mesh(plan: Plan, mesh: Mesh, min_elements: int | None = None, quant: Quantization | None = None) -> dict[str, Any]:
    """The parameters as global arrays on `mesh`, each split by `sharding.partition_spec` (the
    weights `quant` quantises as {"qvalue", "qscale"}, the scales split like the values).

    A piece that fills a whole leaf is placed shard by shard; a part (a layer, one of k/v or
    gate/up, a block of rows) is placed likewise and written into its leaf, which lives only on
    the devices (zeros, sharded, updated in place). Where a leaf's rows are split over the mesh,
    each process reads only the rows its own devices hold; it copies only its devices' slices
    of everything else. So no host holds more than one tensor (or block) at a time.
    """
    quantized = quantized_leaves(plan, quant)
    arrays: dict[tuple[str, ...], jax.Array] = {}
    writers: dict[tuple[str, ...], Any] = {}
    for piece in plan.pieces:
        leaf = plan.leaves[piece.path]
        q = quantized.get(piece.path)
        name = QVALUE if q else None
        spec = tuple(partition_spec("/".join((*piece.path, *([name] if name else []))), leaf.shape, mesh, min_elements))
        spec += (None,) * (len(leaf.shape) - len(spec))
        # (path, leaf shape, dtype, spec) of each array this piece writes into
        targets = [(piece.path, leaf.shape, plan.dtype, spec)]
        if q is not None:
            piece = _whole(piece, q)
            sspec = tuple(scale_spec(spec, q.qvalue.shape, q.qscale.shape, mesh, "/".join(piece.path)))
            targets = [((*piece.path, QVALUE), q.qvalue.shape, q.qvalue.dtype, spec),
                       ((*piece.path, SCALE), q.qscale.shape, q.qscale.dtype, sspec + (None,) * (len(leaf.shape) - len(sspec)))]
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
            parts = _parts(piece, box[row_axis], None if span == (0, box[row_axis]) else span, q, plan.dtype)
        else:  # a box per block of rows (one block if the rows cannot be read apart)
            parts = _parts(piece, _rows_per_block(piece), None, q, plan.dtype)
        for start, part in parts:
            values = [np.expand_dims(part, ints)] if q is None else [part[QVALUE], part[SCALE]]
            for (path, shape, dtype, tspec), value in zip(targets, values):
                tbox = [1 if axis in ints else n for axis, n in enumerate(shape)]
                tbox[row_axis] = box[row_axis] if split_rows else value.shape[row_axis]
                first = np.array([piece.index[a] if a in ints else 0 for a in range(len(tbox))], np.int32)
                first[row_axis] = 0 if split_rows else start
                placed = _place(mesh, value, tbox, tspec, shape, row_axis, start if split_rows else 0)
                if tuple(tbox) == tuple(shape):
                    arrays[path] = placed
                    continue
                if path not in arrays:
                    sharding = NamedSharding(mesh, _canonical(tspec))
                    arrays[path] = jax.jit(lambda s=shape, d=dtype: jnp.zeros(s, d), out_shardings=sharding)()
                    writers[path] = jax.jit(_update_slice, donate_argnums=0, out_shardings=sharding)
                arrays[path] = writers[path](arrays[path], placed, first)
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
