"""LoRA: low-rank adapters on the Gemma decoder's attention and MLP weights.

A weight W (any of `q_einsum`, `kv_einsum`, `attn_vec_einsum`, `gating_einsum`, `linear`) gets a
rank-r update: the layer computes `x W + (x A) B`. A starts random and B at zero, so a fresh adapter
changes nothing. The factors live in their own variable collection, `"lora"`, at the weight's path:

    variables = {"params": params, "lora": {"llm": {"layers": {"attn": {"q_einsum": {"a": [L, D, r], "b": [L, r, N, H]}}}}}}

Like the weights they carry a leading layer axis, which the decoder's `nn.scan` slices. The decoder
adds `delta(module, name, x)` after each projection, so training never forms a weight-sized
update or gradient; `merge` folds `A B` into W for inference (the merged model needs no LoRA code).
Stacked weights (k and v in `kv_einsum`, gate and up in `gating_einsum`) get one adapter each.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Einsum equations for one weight (axis letters of gemma.py; r is the rank)."""

    down: str  # x, A -> x A
    up: str  # x A, B -> the projection's output layout
    merge: str  # A, B -> W's layout


SPECS: dict[str, _Spec] = {
    "q_einsum": _Spec("btd,dr->btr", "btr,rnh->btnh", "dr,rnh->dnh"),
    "kv_einsum": _Spec("btd,cdr->cbtr", "cbtr,crkh->cbtkh", "cdr,crkh->dckh"),
    "attn_vec_einsum": _Spec("btnh,nhr->btr", "btr,rd->btd", "nhr,rd->nhd"),
    "gating_einsum": _Spec("btd,cdr->cbtr", "cbtr,crf->cbtf", "cdr,crf->dcf"),
    "linear": _Spec("btf,fr->btr", "btr,rd->btd", "fr,rd->fd"),
}
# Where the adapted weights sit in the parameter tree.
_LAYERS = ("llm", "layers")
_MODULES = {"attn": ("q_einsum", "kv_einsum", "attn_vec_einsum"), "mlp": ("gating_einsum", "linear")}


def delta(module: nn.Module, name: str, x: jax.Array) -> jax.Array | int:
    """`(x A) B` for the weight `name` of `module`, or 0 when no adapter was given."""
    if not module.has_variable("lora", name):
        return 0
    factors = module.get_variable("lora", name)
    spec = SPECS[name]
    dtype = x.dtype
    return jnp.einsum(spec.up, jnp.einsum(spec.down, x, factors["a"].astype(dtype)), factors["b"].astype(dtype))


def _factor_shapes(spec: _Spec, weight_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B (each with the leading layer axis) for a stacked weight [L, ...]."""
    ins, out = spec.merge.split("->")
    a_axes, b_axes = ins.split(",")
    sizes = dict(zip(out, weight_shape[1:]), r=rank)
    layers = weight_shape[0]
    return (layers, *(sizes[c] for c in a_axes)), (layers, *(sizes[c] for c in b_axes))


def init(params: Any, rank: int, key: jax.Array) -> dict[str, Any]:
    """Fresh float32 adapters of rank `rank` for every attention and MLP weight of the decoder.

    A ~ N(0, 1/fan_in) (fan_in: the input width it contracts), B = 0.
    """
    layers = params[_LAYERS[0]][_LAYERS[1]]
    keys = iter(jax.random.split(key, sum(map(len, _MODULES.values()))))
    tree: dict[str, Any] = {}
    for module, names in _MODULES.items():
        for name in names:
            spec = SPECS[name]
            a_shape, b_shape = _factor_shapes(spec, layers[module][name].shape, rank)
            x_axes, a_axes = spec.down.split("->")[0].split(",")
            fan_in = math.prod(n for c, n in zip(a_axes, a_shape[1:]) if c in x_axes)
            a = jax.random.normal(next(keys), a_shape, jnp.float32) / math.sqrt(fan_in)
            tree.setdefault(module, {})[name] = {"a": a, "b": jnp.zeros(b_shape, jnp.float32)}
    return {_LAYERS[0]: {_LAYERS[1]: tree}}


def merge(params: Any, lora: Any) -> Any:
    """`params` with every adapter folded in: W + A B, in float32 (an update is often finer than
    bfloat16's step at W's magnitude). Other leaves are shared with `params`, which is not modified."""
    merged = jax.tree.map(lambda x: x, params)  # new dicts, same arrays
    layers = merged[_LAYERS[0]][_LAYERS[1]]
    for module, weights in lora[_LAYERS[0]][_LAYERS[1]].items():
        for name, f in weights.items():
            ins, out = SPECS[name].merge.split("->")
            a_axes, b_axes = ins.split(",")
            update = jnp.einsum(f"l{a_axes},l{b_axes}->l{out}", f["a"], f["b"])
            layers[module][name] = layers[module][name].astype(jnp.float32) + update
    return merged
