"""The projection primitive: a weight declared with its einsum equation, logical axes and LoRA.

    self.q_einsum = Einsum("q_einsum", "BTD,DNH->BTNH", (D, N, H), ("embed", "q_heads", "head_dim"), layout, dtype, policy)
    q = self.q_einsum(x)                       # [B, T, D] -> [B, T, N, H]

Axis letters (the same everywhere in the package): B batch, T query length, S key length (cache
slots), D width, N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim,
C a pair of matrices stored as one weight (k and v, gate and up), F MLP width, V vocabulary,
L layers.

The equation is written in the checkpoint layout: the weight's contracted letters come first
([*in, *out]). The weight's `axes` name each of its dimensions for sharding (`sharding.RULES`
maps them to mesh axes). How the weight is stored and multiplied is the layout's and the
policy's business (`backend.Layout`, `backend.Policy`): with `layout.out_first` it is stored
[*out, *in], and `policy` picks the matmul form for the platform it was made for. Whatever the
layout, the parameter sits in the parent module's scope under `name` (big_vision's tree:
`attn/q_einsum`, not `attn/q_einsum/w`).

Quantised weights (`layout.quant`, `quantize.py`): the parameter is a {"qvalue", "qscale"} subtree
in the same stored layout, declared by `declare_weight` (which every quantised weight of the
package goes through: projections, the embedding table, SigLIP's kernels); `backend.project`
multiplies the stored {"qvalue", "qscale"} by x in the form `policy` picks (`quantized_form`): the
dequantised weight `qvalue * qscale` in the activation dtype, or on CPU tile by tile in float32;
`product` never keeps a dequantised weight for a backward pass.

LoRA: when a `"lora"` variable named like the weight is present (`lora.py` creates them), the
projection adds `(x A) B`; A is [C?, *in, r] and B [C?, r, *out without C], a pair weight getting
one adapter per matrix.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pali_jax import backend, quantize
from pali_jax.backend import Layout, Policy
from pali_jax.quantize import Quantization

PAIR = "C"
RANK = "r"
default_init = nn.initializers.normal(stddev=0.02)


def parse(equation: str) -> tuple[str, str, str]:
    """"BTD,DNH->BTNH" -> ("BTD", "DNH", "BTNH"), checked: the weight's contracted letters lead
    it and end x, in the same order, and the output is x's other letters then the weight's."""
    try:
        inputs, out = equation.replace(" ", "").split("->")
        x, w = inputs.split(",")
    except ValueError:
        raise ValueError(f"einsum equation {equation!r} is not of the form 'x,w->y'") from None
    contracted = "".join(c for c in w if c in x and c not in out)
    lead = x[: len(x) - len(contracted)]
    if not (w.startswith(contracted) and x.endswith(contracted) and out == lead + w[len(contracted) :]):
        raise ValueError(f"einsum {equation!r}: a projection contracts x's last axes with the weight's first ones")
    return x, w, out


def in_axes(equation: str) -> int:
    """How many leading weight axes the projection contracts."""
    x, w, _ = parse(equation)
    return sum(c in x for c in w)


def stored(shape: tuple[int, ...], n_in: int, out_first: bool) -> tuple[int, ...]:
    """The stored shape (or axes) of a weight of checkpoint shape [*in, *out]."""
    return (*shape[n_in:], *shape[:n_in]) if out_first else tuple(shape)


def declare_weight(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple,
                   contracted: tuple[int, ...], quant: Quantization | None, packed: bool = False) -> Any:
    """Declares `module`'s weight `name` of stored `shape` with logical `axes` (`init` the float
    initialiser, unboxed) and returns the parameter as stored: a float array, or, with `quant`, a
    {"qvalue", "qscale"} subtree (both leaves carrying `axes`). `contracted`: the axes the
    weight's product sums over, in the stored shape. `packed` (`Layout.int4_packed`): int4 values
    nibble-packed where the weight allows it (`quantize.packable`)."""
    if quant is None:
        return module.param(name, nn.with_logical_partitioning(init, axes), shape)

    def quantized_init(key, shape):
        node = quantize.quantize(init(key, shape), quant, contracted, name)
        if packed and quant.scheme == "int4":
            node = quantize.packed_where_possible(node) or node
        return {k: nn.LogicallyPartitioned(v, axes) for k, v in node.items()}

    return module.param(name, quantized_init, shape)


def product(multiply: Callable[[jax.Array, Any], jax.Array], x: jax.Array, w: Any, dtype) -> jax.Array:
    """`multiply(x, w)` for a parameter `declare_weight` returned: a float weight cast to `dtype`,
    or a quantised one as stored (`backend.project` multiplies it in the form the policy picks),
    under `jax.checkpoint`: differentiated with respect to x (LoRA adapters on a quantised base,
    QLoRA) the backward pass keeps the integers and dequantises again, where it would otherwise keep
    every layer's dequantised weight, a float copy of the model, until the backward pass. Without
    differentiation it is the plain product."""
    if not quantize.is_quantized(w):
        return multiply(x, w.astype(dtype))
    return jax.checkpoint(multiply, prevent_cse=False)(x, w)


class Einsum(nn.Module):
    """A projection weight and its product; see the module docstring."""

    weight: str  # the parameter's name in the parent scope
    equation: str
    shape: tuple[int, ...]  # checkpoint layout, [*in, *out]
    axes: tuple[str, ...]  # one logical axis name per dimension of `shape`
    layout: Layout = Layout()
    dtype: Any = jnp.float32
    policy: Policy = Policy()
    init: Callable = default_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, out_first = in_axes(self.equation), self.layout.out_first
        shape = stored(self.shape, n_in, out_first)
        contracted = tuple(range(len(shape) - n_in, len(shape)) if out_first else range(n_in))
        w = declare_weight(self, self.weight, self.init, shape, stored(self.axes, n_in, out_first), contracted,
                           self.layout.quant, self.layout.int4_packed)
        x = x.astype(self.dtype)
        y = product(lambda x, w: backend.project(x, w, n_in, out_first, self.policy), x, w, self.dtype)
        if self.has_variable("lora", self.weight):
            factors = self.get_variable("lora", self.weight)
            y = y + lora_delta(self.equation, x, factors["a"].astype(self.dtype), factors["b"].astype(self.dtype))
        return y


def shared_scope(parent: nn.Module, **einsums: Einsum) -> None:
    """Binds each Einsum as `parent.<attr>` in `parent`'s own scope (call in `setup`)."""
    for attr, einsum in einsums.items():
        setattr(parent, attr, einsum)
        nn.share_scope(parent, getattr(parent, attr))


# -- LoRA factors, from the equation -------------------------------------------------------------
def _lora_letters(equation: str) -> tuple[str, str, str, str]:
    """(x, A, B, update) letters: A [C?, *in, r], B [C?, r, *out without C], update in W's layout."""
    x, w, out = parse(equation)
    n_in = in_axes(equation)
    ins, outs = w[:n_in], w[n_in:]
    pair = PAIR if PAIR in outs else ""
    a = pair + ins + RANK
    b = pair + RANK + outs.replace(PAIR, "")
    return x, a, b, w


def lora_shapes(equation: str, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(A's shape, B's shape, fan-in of A) for a weight of checkpoint shape `shape`."""
    _, a, b, w = _lora_letters(equation)
    sizes = dict(zip(w, shape), **{RANK: rank})
    fan_in = 1
    for c in w[: in_axes(equation)]:
        fan_in *= sizes[c]
    return tuple(sizes[c] for c in a), tuple(sizes[c] for c in b), fan_in


def lora_delta(equation: str, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`(x A) B` in the projection's output layout."""
    xs, a_letters, b_letters, w = _lora_letters(equation)
    _, _, out = parse(equation)
    lead = out[: len(out) - (len(w) - in_axes(equation))]
    hidden = lead + (PAIR if PAIR in a_letters else "") + RANK
    down = jnp.einsum(f"{xs},{a_letters}->{hidden}", x, a)
    return jnp.einsum(f"{hidden},{b_letters}->{out}", down, b)


def lora_update(equation: str, a: jax.Array, b: jax.Array, stacked: bool) -> jax.Array:
    """A B in the weight's checkpoint layout (with a leading [L] axis when `stacked`)."""
    _, a_letters, b_letters, w = _lora_letters(equation)
    layer = "L" if stacked else ""
    return jnp.einsum(f"{layer}{a_letters},{layer}{b_letters}->{layer}{w}", a, b)
