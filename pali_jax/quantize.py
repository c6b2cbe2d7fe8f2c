"""Weight-only quantisation: int8 per output channel, int4 in groups along the contracted axis.

A quantised weight is an ordinary subtree where the float weight was, in the weight's own stored
layout, each leaf carrying the weight's logical axes (so sharding, orbax, manifests and the layout
conversions treat it like any other pair of arrays):

    {"qvalue": int8 / int4 [same shape as the weight], "qscale": float32 [same rank]}

or, int4 nibble-packed (`pack_int4`: what decoding reads on CPUs that run `cpu_kernels`' int4
product, `backend.Layout.int4_packed`), "qvalue": uint8 [..., last axis / 2], two values per byte.

`qscale` has the weight's size on every output axis and 1 on the contracted axes (int8), or
(int4) cuts the LAST contracted axis into groups of `group_size` (a size-n axis gets
n / group_size scales; an axis shorter than the group is one group) and keeps the others' sizes
(`attn_vec_einsum` [N, H, D]: groups within each head). The weight is `qvalue * qscale` (qscale
broadcast over its group), which is what the model computes with (`dequantize`): gradients flow
through it into LoRA adapters, and nothing weight-sized is ever stored in float.

What is quantised (`layers.declare_weight` is where each module declares it): the decoder's
projections (`layers.Einsum`), the tied embedding table [V, D] (by rows: it is also the logits
projection, contracted over D) and SigLIP's projections and projector. SigLIP is int8 in both
schemes: its MLP width 4304 and head dim 72 are not multiples of int4's groups, and it runs once
per image, so its bytes do not weigh on decoding. Norms, biases, the patch embedding and the
position embedding stay in float.

The numerics are qwix's (`qwix.quantize`, `qwix.dequantize`: symmetric absmax scales, the int8
bound 127.5, round half to even). qwix's own model rewriting (`qwix.quantize_model`, which
intercepts the dot products a module calls) does not fit this package's projections: they
reshape the weight to 2-D and, on CPU in bfloat16, multiply it as the LEFT operand
(`backend.project`), and the embedding table is read by rows; qwix's PTQ weights refuse the
reshape and it quantises only right-hand operands. So the weights are quantised here, where they
are declared, and multiplied in the form the backend policy picks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from pali_jax.errors import UserError

Scheme = Literal["int8", "int4"]
SCHEMES: tuple[Scheme, ...] = ("int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
DEFAULT_GROUP_SIZE = 128
QVALUE, SCALE = "qvalue", "qscale"  # "qscale": a norm's "scale" is another leaf


class QuantizationError(UserError):
    """A quantisation a model cannot take: an unknown scheme, a group size that does not divide a
    weight's contracted axis, an already quantised source, a mesh that splits a group."""


@dataclasses.dataclass(frozen=True)
class Quantization:
    """scheme: "int8" (per output channel) or "int4" (groups of `group_size` along the contracted axis)."""

    scheme: Scheme = "int8"
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantization {self.scheme!r}; use {' or '.join(SCHEMES)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
            raise QuantizationError(f"group size must be a positive integer, got {self.group_size!r}")

    @property
    def vision(self) -> Quantization:
        """SigLIP's quantisation: int8 in both schemes (see the module docstring)."""
        return Quantization("int8", self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": int(self.group_size)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Quantization:
        try:
            return cls(d["scheme"], d.get("group_size", DEFAULT_GROUP_SIZE))
        except (KeyError, TypeError, AttributeError):
            raise QuantizationError(f"a quantization record must be {{'scheme': ..., 'group_size': ...}}, got {d!r}") from None


def parse(quantize: str | Quantization | None, group_size: int | None = None) -> Quantization | None:
    """`from_pretrained(quantize=...)` / `--quantize`: None, "none", "int8", "int4" or a `Quantization`."""
    if quantize is None or quantize == "none":
        if group_size is not None:
            raise QuantizationError("a group size needs --quantize int4")
        return None
    if isinstance(quantize, Quantization):
        return quantize if group_size is None else dataclasses.replace(quantize, group_size=group_size)
    if not isinstance(quantize, str):
        raise QuantizationError(f"quantize must be int8, int4 or None, got {quantize!r}")
    return Quantization(quantize, DEFAULT_GROUP_SIZE if group_size is None else group_size)


# -- one weight ----------------------------------------------------------------------------------
def groups(quant: Quantization, shape: tuple[int, ...], contracted: tuple[int, ...], name: str = "a weight") -> dict:
    """qwix's tiled axes: {last contracted axis: group} for int4, {} for int8; refused where the
    group does not divide the axis."""
    if quant.scheme != "int4" or not contracted:
        return {}
    axis = contracted[-1]
    n = shape[axis]
    group = min(quant.group_size, n)
    if n % group:
        raise QuantizationError(f"int4 group size {quant.group_size} does not divide {name}'s contracted axis of "
                                f"{n}: pick a group size that divides it (e.g. {_divisor(n, quant.group_size)})")
    return {axis: group}


def _divisor(n: int, near: int) -> int:
    return max(d for d in range(1, min(n, near) + 1) if n % d == 0)


def scale_shape(quant: Quantization, shape: tuple[int, ...], contracted: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a weight's scales (see the module docstring)."""
    tiled = groups(quant, shape, contracted)
    reduced = tiled or contracted
    return tuple(n // tiled[a] if a in tiled else 1 if a in reduced else n for a, n in enumerate(shape))


@functools.partial(jax.jit, static_argnames=("scheme", "contracted", "tiled"))
def _quantize(w: jax.Array, scheme: str, contracted: tuple[int, ...], tiled: tuple[tuple[int, int], ...]):
    # int8: one scale per output channel. int4: groups along the last contracted axis, the other
    # contracted axes (attn_vec_einsum's heads) each with their own groups.
    reduced = dict(tiled) if tiled else contracted
    channels = tuple(a for a in range(w.ndim) if a not in reduced)
    q = qwix.quantize(w.astype(jnp.float32), QTYPES[scheme], channelwise_axes=channels, tiled_axes=dict(tiled))
    return q.qvalue, q.scale


def quantize(w, quant: Quantization, contracted: tuple[int, ...], name: str = "a weight") -> dict[str, jax.Array]:
    """One float weight (any float dtype, any array) -> {"qvalue", "qscale"}, `contracted` being
    the axes its product sums over (in the weight's stored layout). Computed in float32, so the
    same weight gives the same bits however it was loaded."""
    tiled = groups(quant, tuple(np.shape(w)), tuple(contracted), name)
    qvalue, scale = _quantize(w, quant.scheme, tuple(contracted), tuple(sorted(tiled.items())))
    return {QVALUE: qvalue, SCALE: scale}


# A packed weight's values, in chunks of PACK_CHUNK along the last axis: little-endian 16-bit word
# j of a chunk holds values j, 32 + j, 64 + j and 96 + j in its four nibbles, low to high, each as
# value + 8. Each nibble stream is then a contiguous run of 32 inputs, multiplied without a shuffle.
PACK_CHUNK = 128


def packable(qvalue_shape: tuple[int, ...], scale_shape_: tuple[int, ...]) -> bool:
    """Whether an int4 weight can be nibble-packed: its last axis is the grouped, contracted one,
    and its groups are whole chunks (PACK_CHUNK)."""
    if not qvalue_shape:
        return False
    n, groups_ = qvalue_shape[-1], scale_shape_[-1]
    return groups_ < n and n % groups_ == 0 and (n // groups_) % PACK_CHUNK == 0


def pack_int4(qvalue: jax.Array) -> jax.Array:
    """int4 values [..., K] (any integer dtype, in [-8, 7]) -> uint8 [..., K / 2] (see PACK_CHUNK)."""
    u = (qvalue.astype(jnp.int8) + 8).astype(jnp.uint8)
    u = u.reshape(*qvalue.shape[:-1], -1, 2, 2, 32)  # [..., chunks, byte of the word, nibble, word]
    b = u[..., 0, :] | (u[..., 1, :] << 4)  # [..., chunks, byte of the word, word]
    return jnp.swapaxes(b, -1, -2).reshape(*qvalue.shape[:-1], -1)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 [..., K / 2] from `pack_int4` -> int8 values [..., K]."""
    b = jnp.swapaxes(packed.reshape(*packed.shape[:-1], -1, 32, 2), -1, -2)  # [..., chunks, byte of the word, word]
    u = jnp.stack([b & 0xF, b >> 4], axis=-2).astype(jnp.int8)  # [..., chunks, byte of the word, nibble, word]
    return (u - 8).reshape(*packed.shape[:-1], -1)


def is_packed(value_dtype) -> bool:
    """Whether quantised values of `value_dtype` are nibble-packed int4 (`pack_int4` gives uint8)."""
    return jnp.dtype(value_dtype) == jnp.uint8


def packed_where_possible(node: Mapping[str, jax.Array], pack: Callable = pack_int4) -> dict[str, jax.Array] | None:
    """The int4 weight `node` with its values nibble-packed (by `pack`, `pack_int4` or a jitted
    one), or None where its groups are not whole chunks (`packable`)."""
    if not packable(tuple(node[QVALUE].shape), tuple(node[SCALE].shape)):
        return None
    return {**node, QVALUE: pack(node[QVALUE])}


def value_shape(node: Mapping[str, jax.Array]) -> tuple[int, ...]:
    """A quantised weight's shape (that of its values, unpacked)."""
    shape = tuple(node[QVALUE].shape)
    return (*shape[:-1], 2 * shape[-1]) if is_packed(node[QVALUE].dtype) else shape


def values(node: Mapping[str, jax.Array]) -> jax.Array:
    """A quantised weight's integer values, unpacked (int8) where they are nibble-packed."""
    q = node[QVALUE]
    return unpack_int4(q) if is_packed(q.dtype) else q


def dequantize(node: Mapping[str, jax.Array], dtype=jnp.float32) -> jax.Array:
    """{"qvalue", "qscale"} -> the weight `qvalue * qscale` (computed in float32) in `dtype`."""
    qvalue = values(node)
    q = qwix.QArray(qvalue, node[SCALE].astype(jnp.float32), qtype=qvalue.dtype)
    return qwix.dequantize(q).astype(dtype)


def dequantize_params(params: Any, dtype=jnp.float32) -> Any:
    """`params` with every quantised weight dequantised into `dtype` (other leaves shared)."""
    if is_quantized(params):
        return dequantize(params, dtype)
    if isinstance(params, Mapping):
        return {k: dequantize_params(v, dtype) for k, v in params.items()}
    return params


def is_quantized(node: Any) -> bool:
    """Whether a parameter-tree node is a quantised weight."""
    return isinstance(node, Mapping) and set(node) == {QVALUE, SCALE}


def is_quantized_leaf(path: tuple) -> bool:
    """Whether a tree path (jax key path or plain keys) ends in a quantised weight's leaf."""
    last = path[-1] if path else None
    return str(getattr(last, "key", last)) in (QVALUE, SCALE)


def contracted_axes(qvalue_shape: tuple[int, ...], scale_shape_: tuple[int, ...]) -> tuple[int, ...]:
    """A quantised weight's reduced axes, read from its shapes: those where the scale is smaller
    than the weight (int4: only the grouped axis). Quantising along them again gives the same
    scales (a size-1 axis counts either way)."""
    return tuple(a for a, (n, s) in enumerate(zip(qvalue_shape, scale_shape_)) if s != n)


def scheme_of(params: Any) -> Quantization | None:
    """The quantisation a parameter tree holds, or None: int4 wins (SigLIP is int8 in both), with
    the group size its int4 weights' shapes say (the largest group found: an axis shorter than
    the group is one group, and any larger group size gives the same tree)."""
    found, group = None, 0

    def walk(node):
        nonlocal found, group
        if is_quantized(node):
            qvalue, scale, shape = node[QVALUE], node[SCALE], value_shape(node)
            if jnp.dtype(qvalue.dtype) == jnp.dtype(jnp.int4) or is_packed(qvalue.dtype):
                contracted = contracted_axes(shape, tuple(scale.shape))
                group = max(group, _group_of(shape, tuple(scale.shape), contracted))
            found = found or "int8"
        elif isinstance(node, Mapping):
            for v in node.values():
                walk(v)

    walk(params)
    if group:
        return Quantization("int4", group)
    return None if found is None else Quantization("int8")


def quantize_params(params: Any, abstract: Any, cast: Any = None) -> Any:
    """A float parameter tree quantised as `abstract` (the quantised model's abstract tree,
    `paligemma.abstract_params` with a quantised layout) says: each float weight whose place in
    `abstract` is a {"qvalue", "qscale"} node becomes one, from its values in float32; with
    `cast`, the other leaves are cast to that dtype. A weight is quantised in slices along an
    uncontracted leading axis (layers, vocabulary rows), so that memory holds the quantised tree
    and one slice, never a float copy of a weight. A new tree; `params` is not modified."""

    def walk(p, a, path):
        name = "/".join(path)
        if is_quantized(a):
            if is_quantized(p):
                raise QuantizationError(f"{name} is already quantized: quantize a float model")
            return _quantize_leaf(p, a, name)
        if isinstance(a, Mapping):
            if not isinstance(p, Mapping) or set(p) != set(a):
                raise QuantizationError(f"{name or 'the parameters'} do not match the model's tree"
                                        + (": they are already quantized" if is_quantized(p) else ""))
            return {k: walk(p[k], a[k], (*path, k)) for k in a}
        return p if cast is None else p.astype(cast)

    return walk(params, abstract, ())


_SLICE_BYTES = 64 << 20  # float32 bytes quantised at once


def _quantize_leaf(w, a: Mapping, name: str) -> dict[str, np.ndarray]:
    contracted = contracted_axes(a[QVALUE].shape, a[SCALE].shape)
    scheme = "int4" if jnp.dtype(a[QVALUE].dtype) == jnp.dtype(jnp.int4) else "int8"
    quant = Quantization(scheme, _group_of(a[QVALUE].shape, a[SCALE].shape, contracted))
    if tuple(np.shape(w)) != tuple(a[QVALUE].shape):
        raise QuantizationError(f"{name} has shape {tuple(np.shape(w))}, the model wants {tuple(a[QVALUE].shape)}")
    if 0 in contracted or not np.shape(w) or isinstance(w, jax.Array) and not w.is_fully_addressable:
        return quantize(w, quant, contracted, name)
    rows = max(1, _SLICE_BYTES // max(1, 4 * int(np.prod(np.shape(w)[1:]))))
    out = {QVALUE: np.empty(a[QVALUE].shape, a[QVALUE].dtype), SCALE: np.empty(a[SCALE].shape, a[SCALE].dtype)}
    for start in range(0, np.shape(w)[0], rows):
        part = quantize(w[start : start + rows], quant, contracted, name)
        for k, v in part.items():
            out[k][start : start + rows] = np.asarray(v)
    return out


def _group_of(qshape, sshape, contracted) -> int:
    """The group size a quantised weight's shapes say (its last contracted axis)."""
    if not contracted:
        return DEFAULT_GROUP_SIZE
    axis = contracted[-1]
    return qshape[axis] // sshape[axis]
