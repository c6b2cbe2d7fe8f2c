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

# XLA:CPU adopts a host array aligned to this many bytes without copying it (`jax.device_put`), so
# a loaded model moves onto the CPU device in no extra memory.
_ALIGN = 64

# Rows of a tensor read (and placed) at once: about this many bytes. Assign to change it for a
# whole process (the tests do, to cut tiny tensors into several blocks).
BLOCK_BYTES = 64 << 20


def _empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty, its data aligned to _ALIGN bytes."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + n].view(dtype).reshape(shape)


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


_STACKED = ("llm", "layers")  # the decoder's stacked layers in the checkpoint layout


def _layer_path(path: LeafPath, layer: int) -> LeafPath:
    return ("llm", f"layers_{layer}", *path[len(_STACKED):])


def per_layer_possible(plan: Plan) -> bool:
    """Whether every piece of the decoder's stacked leaves fills one layer (HF checkpoints; not
    big_vision's, whose tensors hold every layer)."""
    return all(p.index and isinstance(p.index[0], int) for p in plan.pieces if p.path[: len(_STACKED)] == _STACKED)


def _split_layers(plan: Plan, quantized: dict[LeafPath, _Quantized]) -> tuple[dict, list[Piece], dict]:
    """The plan's leaves, pieces and quantised leaves with each stacked decoder leaf [L, ...] cut
    into L leaves `llm/layers_{i}/...` (the per-layer tree, in the checkpoint's axis order)."""
    leaves: dict[LeafPath, jax.ShapeDtypeStruct] = {}
    split: dict[LeafPath, _Quantized] = {}
    for path, leaf in plan.leaves.items():
        q = quantized.get(path)
        if path[: len(_STACKED)] != _STACKED:
            leaves[path] = leaf
            if q is not None:
                split[path] = q
            continue
        for layer in range(leaf.shape[0]):
            leaves[_layer_path(path, layer)] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
            if q is not None:  # the layer axis is never contracted: the scales keep it whole
                split[_layer_path(path, layer)] = _Quantized(
                    q.how, tuple(a - 1 for a in q.contracted), jax.ShapeDtypeStruct(q.qvalue.shape[1:], q.qvalue.dtype),
                    jax.ShapeDtypeStruct(q.qscale.shape[1:], q.qscale.dtype))
    pieces = [dataclasses.replace(p, path=_layer_path(p.path, p.index[0]), index=p.index[1:])
              if p.path[: len(_STACKED)] == _STACKED else p for p in plan.pieces]
    return leaves, pieces, split


def to_host(plan: Plan, quant: Quantization | None = None, per_layer: bool = False) -> dict[str, Any]:
    """The parameters as a nested dict of numpy arrays of `plan.dtype`, the weights `quant`
    quantises as {"qvalue", "qscale"} (quantised tensor by tensor). Refused up front if they would
    not fit the host's available memory.

    per_layer (where `per_layer_possible`): the decoder's layers as separate arrays,
    `llm/layers_{i}/...` (`Layout(stacked=False)` in the checkpoint's axis order), so that a
    layout change can move them one layer at a time and drop each once moved, never holding a
    stacked weight beside its moved copy."""
    quantized = quantized_leaves(plan, quant)
    leaves, pieces = plan.leaves, plan.pieces
    if per_layer and per_layer_possible(plan):
        leaves, pieces, quantized = _split_layers(plan, quantized)
    shapes: dict[LeafPath, tuple[tuple[int, ...], Any]] = {}
    for path, leaf in leaves.items():
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
    arrays = {path: _empty(shape, dtype) for path, (shape, dtype) in shapes.items()}
    for piece in pieces:
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
