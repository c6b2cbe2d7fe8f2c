"""The checked plan of a weight load: which source tensor fills which part of which parameter.

A source format (`weights.hf`, `weights.big_vision`) knows only its names and layouts: it turns
each stored tensor into a `Piece` (the tensor, the parameter it fills, the part of it, the layout
change). `make_plan` then checks the pieces against the model's own tree (`jax.eval_shape` of its
init, `paligemma.abstract_params`) from the headers alone, before any data is read: every tensor
floating point, every tensor placed where the model has a parameter of the right shape, no part
given twice, every parameter (and each of its layers) filled. `materialise` reads the data.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pali_jax.config import PaliGemmaConfig
from pali_jax.errors import UserError
from pali_jax.paligemma import abstract_params

# The dtypes a user may name (loading, running, exporting); every source is read into one of them.
# jax's own scalar types, as the rest of the library passes them (they hash unlike numpy's dtypes,
# and a jitted function keyed on a dtype would compile again for the other kind).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class WeightError(UserError):
    """Weights that cannot be read or written; the message (one line) says which file or tensor and why."""


class Tensor(Protocol):
    """A stored tensor, readable by rows of its leading axis (a scalar is read whole)."""

    shape: tuple[int, ...]
    dtype: np.dtype  # as stored (bfloat16 as `ml_dtypes.bfloat16`)

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """The whole tensor in order, `rows` rows at a time (the container checks what it can, e.g. CRCs)."""
        ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop only."""
        ...


LeafPath = tuple[str, ...]
# The part of a leaf a piece fills: one entry per leading axis, an int (that layer, that one of
# the k/v or gate/up pair) or ALL; () is the whole leaf.
Index = tuple[int | slice, ...]
ALL = slice(None)
Transform = Callable[[np.ndarray], np.ndarray]


def same(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class Piece:
    """One source tensor and where it goes. `transform` turns the stored layout into ours (a
    reshape or transpose); `keeps_rows`: it keeps the leading axis in front, so rows of the
    tensor are rows of the part and the tensor can be read, and placed, a block of rows at a time."""

    name: str  # for messages: "tensor 'language_model.model.norm.weight'", "x.npz: 'llm/final_norm/scale'"
    tensor: Tensor
    path: LeafPath
    index: Index = ()
    transform: Transform = same
    keeps_rows: bool = True

    def ints(self) -> list[int]:
        """The leaf axes this piece fixes to one position."""
        return [axis for axis, i in enumerate(self.index) if isinstance(i, int)]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked load: every piece placed and of the right shape, every leaf (and each of its
    layers) filled exactly once; `dtype` the output's."""

    config: PaliGemmaConfig
    dtype: np.dtype
    leaves: dict[LeafPath, jax.ShapeDtypeStruct]  # the model's parameters, flat
    pieces: list[Piece]


def resolve_dtype(dtype: str | None, stored: Sequence[np.dtype]) -> np.dtype:
    """The output dtype: "float32" / "bfloat16", or None / "auto" for the dtype most tensors are
    stored in (float16 and float64 are read as float32: the model runs in float32 or bfloat16)."""
    if dtype in (None, "auto"):
        common = Counter(stored).most_common(1)[0][0] if stored else np.dtype(np.float32)
        return common if common in (np.float32, BFLOAT16) else np.dtype(np.float32)
    if dtype not in DTYPES:
        raise WeightError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    return np.dtype(DTYPES[dtype])


def _floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == BFLOAT16


def _layout_shape(piece: Piece) -> tuple[int, ...] | None:
    """The shape `piece.transform` gives its tensor (None: it cannot take that shape). The layout
    transforms only reshape and transpose, so this reads no data."""
    try:
        return jax.eval_shape(piece.transform, jax.ShapeDtypeStruct(piece.tensor.shape, jnp.float32)).shape
    except (TypeError, ValueError):  # a reshape or transpose that does not fit the stored shape
        return None


def make_plan(config: PaliGemmaConfig, pieces: list[Piece], dtype: str | None, model: str) -> Plan:
    """Checks `pieces` against `config`'s model (`model` names it in messages, e.g. "config.json's
    model"); see `Plan`."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    leaves = {tuple(k.key for k in p): leaf for p, leaf in flat}
    depth = {path: max((len(p.index) for p in pieces if p.path == path), default=0) for path in leaves}
    filled: dict[LeafPath, np.ndarray] = {}  # per leaf: which parts are filled, over its indexed axes
    for piece in pieces:
        tensor, where = piece.tensor, "/".join(piece.path)
        if not _floating(tensor.dtype):
            raise WeightError(f"{piece.name} is {tensor.dtype}: PaliGemma weights are floating point")
        leaf = leaves.get(piece.path)
        if leaf is None:
            raise WeightError(f"{piece.name} maps to {where}, which {model} lacks")
        part_shape = tuple(n for axis, n in enumerate(leaf.shape) if axis not in piece.ints())
        if _layout_shape(piece) != part_shape or any(piece.index[axis] >= leaf.shape[axis] for axis in piece.ints()):
            raise WeightError(
                f"{piece.name} has shape {tensor.shape}, which does not fit {where} {leaf.shape} of {model}"
            )
        flags = filled.setdefault(piece.path, np.zeros(leaf.shape[: depth[piece.path]], bool))
        part = flags[piece.index]
        if part.any():
            raise WeightError(f"{piece.name}: {where} (or a layer of it) is given twice")
        flags[piece.index] = True
    for path in leaves:
        if path not in filled or not filled[path].all():
            raise WeightError(f"the checkpoint has no tensor for {'/'.join(path)} (or for some of its layers)")
    return Plan(config, resolve_dtype(dtype, [p.tensor.dtype for p in pieces]), leaves, pieces)
