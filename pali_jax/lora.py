"""LoRA: low-rank adapters on the Gemma decoder's projections (`layers.Einsum` weights).

A weight W (any of `q_einsum`, `kv_einsum`, `attn_vec_einsum`, `gating_einsum`, `linear`) gets a
rank-r update: the projection computes `x W + (x A) B` (`layers.Einsum`, `layers.lora_delta`). A
starts random and B at zero, so a fresh adapter changes nothing. The factors live in their own
variable collection, `"lora"`, at the weight's path:

    variables = {"params": params, "lora": {"llm": {"layers": {"attn": {"q_einsum": {"a": [L, D, r], "b": [L, r, N, H]}}}}}}

Like the weights they carry a leading layer axis, which the decoder's `nn.scan` slices. Their
shapes follow from each projection's einsum equation (`layers.lora_shapes`), found by tracing the
model once (no compute): nothing here repeats the equations. Training never forms a weight-sized
update or gradient; `merge` folds `A B` into W for inference (the merged model needs no LoRA code).
A pair weight (k and v in `kv_einsum`, gate and up in `gating_einsum`) gets one adapter per matrix.

Kept apart from their base (`pali-jax finetune --export-adapters-apart`), the adapters are one
`.npz` file in the model directory (`ADAPTERS_FILE`, keys "llm/layers/attn/q_einsum/a", float32),
which `PaliGemma.from_pretrained` folds into the base as it loads it (`merge`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from pali_jax import layers, quantize

ADAPTED = ("llm/",)  # path prefixes of the projections that get adapters
ADAPTERS_FILE = "lora_adapters.npz"  # in a model directory whose adapters are kept apart from its base


def projections(model: nn.Module, params: Any) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    """{path of an adapted weight: (its einsum equation, its checkpoint shape per layer)}, found by
    tracing `model` on its parameters (abstractly: no compute). Cached per model and parameter
    shapes: `merge` runs at every evaluation of a fine-tuning run."""
    leaves, treedef = jax.tree.flatten(params)
    return _projections(model, treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype)) for x in leaves))


@functools.cache
def _projections(model: nn.Module, treedef, shapes: tuple) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    found: dict[tuple[str, ...], tuple[str, tuple[int, ...]]] = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, layers.Einsum) and context.method_name == "__call__":
            path = (*m.scope.path, m.weight)
            if "/".join(path).startswith(ADAPTED):
                found[path] = (m.equation, m.shape)
        return next_fun(*args, **kwargs)

    params = treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes])
    size = model.cfg.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, x, i: model.apply({"params": p}, x, i), params, pixels, ids)
    return found


def _stacked(path: tuple[str, ...]) -> bool:
    return "layers" in path


def init(model: nn.Module, params: Any, rank: int, key: jax.Array) -> dict[str, Any]:
    """Fresh float32 adapters of rank `rank` for every decoder projection of `model`.

    A ~ N(0, 1/fan_in) (fan_in: the input width it contracts), B = 0.
    """
    found = projections(model, params)
    keys = iter(jax.random.split(key, len(found)))
    tree: dict[str, Any] = {}
    depth = model.cfg.text.depth
    for path, (equation, shape) in sorted(found.items()):
        a_shape, b_shape, fan_in = layers.lora_shapes(equation, shape, rank)
        if _stacked(path):
            a_shape, b_shape = (depth, *a_shape), (depth, *b_shape)
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node["a"] = jax.random.normal(next(keys), a_shape, jnp.float32) / math.sqrt(fan_in)
        node["b"] = jnp.zeros(b_shape, jnp.float32)
    return tree


def merge(model: nn.Module, params: Any, adapters: Any) -> Any:
    """`params` with every adapter folded in: W + A B, in float32 (an update is often finer than
    bfloat16's step at W's magnitude); a quantised W (QLoRA) is dequantised first. Other leaves are shared with `params`, which is not modified.
    `params` must be in the checkpoint layout (`model.layout`'s input-first projections)."""
    merged = jax.tree.map(lambda x: x, params)  # new dicts, same arrays
    for path, (equation, _) in projections(model, params).items():
        node, factors = merged, adapters
        for part in path[:-1]:
            node, factors = node[part], factors[part]
        f = factors[path[-1]]
        update = layers.lora_update(equation, f["a"], f["b"], _stacked(path))
        w = node[path[-1]]
        base = quantize.dequantize(w, jnp.float32) if quantize.is_quantized(w) else w.astype(jnp.float32)
        node[path[-1]] = base + update
    return merged


def save(path: str | Path, adapters: Any) -> None:
    """Writes `adapters` (host or device arrays) to the `.npz` file `path` as float32, one array per
    "/"-joined path."""
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(adapters).items()}
    with open(path, "wb") as f:
        np.savez(f, **flat)


def load(path: str | Path) -> dict[str, Any]:
    """The adapters `save` wrote, as a nested dict of float32 numpy arrays."""
    with np.load(path, allow_pickle=False) as f:
        return traverse_util.unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})
