"""PaliGemma in Flax linen: SigLIP (+ projector) -> merge with text embeddings -> Gemma.

Parameters live under `img/...` (vision tower, `img/head` = projector) and `llm/...` (decoder), as
in big_vision. Three entry points share one decoder pass (`_decode`):
  `__call__`  full-sequence logits, no cache: the training / scoring path;
  `prefill`   image + prompt into a KV cache, logits of the last position only;
  `step`      new tokens (suffix) against the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pali_jax import quantize
from pali_jax.config import PaliGemmaConfig
from pali_jax.backend import CHECKPOINT_LAYOUT, Layout, Policy
from pali_jax.gemma import Gemma
from pali_jax.intermediates import INTERMEDIATES
from pali_jax.kv_cache import KVCache
from pali_jax.masks import PrefixLM
from pali_jax.siglip import SigLIP

# HF counts RoPE positions from 1 (big_vision from 0): the same under RoPE up to rounding, and HF
# is the reference we match.
_FIRST_POSITION = 1


class PaliGemmaModel(nn.Module):
    """layout: how the decoder's weights are stored (`backend.Layout`); policy: the platform the
    model's programs are traced for (`backend.Policy`: matmul forms, attention kernel). Neither
    changes the numbers beyond rounding. The default policy names no platform (a portable
    program); `pretrained.PaliGemma` and `train.Trainer` pass `Policy.host()` unless told."""

    cfg: PaliGemmaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    layout: Layout = Layout()
    policy: Policy = Policy()

    def setup(self):
        quant = self.layout.quant
        self.img = SigLIP(self.cfg.vision, self.cfg.text.width, self.dtype, self.remat, quant and quant.vision, self.policy)
        self.llm = Gemma(self.cfg.text, self.dtype, self.remat, self.layout, self.policy)

    def embed_image(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [-1, 1] -> image tokens [B, P, D] (projected, not scaled)."""
        tokens = self.img(pixel_values)
        self.sow(INTERMEDIATES, "image_features", tokens)
        return tokens

    def embed_inputs(self, input_ids: jax.Array, image_tokens: jax.Array) -> jax.Array:
        """Text embeddings [B, T, D] with the k-th `<image>` id of each row replaced by its k-th
        image token. Text embeddings are scaled by sqrt(D); image tokens are not."""
        is_image = input_ids == self.cfg.image_token_id
        text = self.llm.embed(jnp.where(is_image, 0, input_ids))
        k = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_tokens.shape[1] - 1)  # [B, T]
        image = jnp.take_along_axis(image_tokens, k[..., None], axis=1).astype(text.dtype)
        return jnp.where(is_image[..., None], image, text)

    def _decode(self, x, prefix, valid, cache: KVCache | None):
        """The decoder over x [B, T, D] with token types and padding; returns (hidden, cache)."""
        seen = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, T]: real tokens before each
        if cache is None:
            slots = jnp.arange(x.shape[1])
            kv_prefix, kv_valid, kv, start, first = prefix, valid, None, 0, 0
        else:
            start = cache.index
            slots = start + jnp.arange(x.shape[1])
            pad = jnp.zeros((x.shape[0], cache.length), bool)
            kv_prefix = jax.lax.dynamic_update_slice(pad, prefix, (0, start))
            kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, start))
            kv, first = (cache.k, cache.v), cache.positions[:, None]
        positions = _FIRST_POSITION + first + seen
        h, kv = self.llm(x, positions, PrefixLM(slots, prefix, kv_prefix, kv_valid), kv, start)
        if cache is not None:
            cache = cache.advance(kv[0], kv[1], valid)
        return h, cache

    def __call__(self, pixel_values, input_ids, token_type_ids=None, attention_mask=None, logits_from: int = 0
                 ) -> jax.Array:
        """Logits [B, T - logits_from, V] float32 of positions logits_from.. (no cache).

        token_type_ids None: everything is prefix (bidirectional); attention_mask None: no padding.
        logits_from: training skips the image positions, which never predict a target: at the full
        vocabulary their logits would be most of a fine-tuning step's activations.
        """
        prefix, valid = _types_and_mask(input_ids, token_type_ids, attention_mask)
        x = self.embed_inputs(input_ids, self.embed_image(pixel_values))
        h, _ = self._decode(x, prefix, valid, None)
        return self.llm.logits(h[:, logits_from:])

    def prefill(self, pixel_values, input_ids, token_type_ids, attention_mask, cache: KVCache):
        """Runs image + prompt into `cache`; returns (logits [B, V] of the last position, cache).

        Rows must be left-padded so that every row's last position is a real token.
        """
        prefix, valid = _types_and_mask(input_ids, token_type_ids, attention_mask)
        x = self.embed_inputs(input_ids, self.embed_image(pixel_values))
        h, cache = self._decode(x, prefix, valid, cache)
        return self.llm.logits(h[:, -1:])[:, 0], cache

    def step(self, tokens: jax.Array, cache: KVCache, valid: jax.Array | None = None):
        """Suffix tokens [B, T] against the cache; returns (logits [B, T, V], cache).

        valid [B, T] False marks tokens that must not be attended later (e.g. after a row ended).
        """
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid
        h, cache = self._decode(self.llm.embed(tokens), jnp.zeros(tokens.shape, bool), valid, cache)
        return self.llm.logits(h), cache


def _types_and_mask(input_ids, token_type_ids, attention_mask):
    """(prefix [B, T] bool, valid [B, T] bool) with the defaults of `PaliGemmaModel.__call__`."""
    prefix = jnp.ones(input_ids.shape, bool) if token_type_ids is None else token_type_ids == 0
    valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    return prefix, valid


@functools.cache
def _model_init_shapes(cfg: PaliGemmaConfig, layout: Layout):
    """`jax.eval_shape` of the model's init: boxed (logically partitioned) parameter shapes. Cached:
    loading, sharding, training and layout detection all ask for it, and tracing a per-layer model's
    init is the slow part of a warm start. Callers must not modify the tree."""
    size = cfg.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(PaliGemmaModel(cfg, layout=layout).init, jax.random.PRNGKey(0), pixels, ids)["params"]


def abstract_params(cfg: PaliGemmaConfig, dtype: jnp.dtype = jnp.float32, layout: Layout = CHECKPOINT_LAYOUT):
    """The model's parameters as `jax.ShapeDtypeStruct`s (no memory), in `layout`: float
    parameters in `dtype`; a quantised weight's leaves (`layout.quant`) keep their own dtypes
    (integers as the layout holds them, float32 scales)."""
    shapes = nn.meta.unbox(_model_init_shapes(cfg, layout))

    def leaf(path, x):
        if not quantize.is_quantized_leaf(path):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        held = jnp.int8 if layout.int4_bytes and x.dtype == jnp.int4 else x.dtype
        return jax.ShapeDtypeStruct(x.shape, held)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


Axes = tuple  # one logical axis name (or None) per dimension


def path_key(path: tuple) -> str:
    """A parameter path as "/"-joined keys, per-layer indices generalised (`layers_3` -> `layers_*`)."""
    parts = (str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return re.sub(r"(^|/)layers_\d+(/|$)", r"\1layers_*\2", "/".join(parts))


@functools.cache
def axes_table(layout: Layout) -> dict[str, Axes]:
    """{path_key: logical axes} of every parameter the model declares in `layout`, whatever the
    sizes (read from a tiny Gemma 2 PaliGemma, whose tree holds every kind of parameter)."""
    from pali_jax.config import preset

    big = preset("paligemma2-3b-224")
    text = dataclasses.replace(big.text, vocab_size=8, width=8, depth=2, mlp_dim=8, num_heads=2, num_kv_heads=1,
                               head_dim=4, sliding_layers=(True, False))
    vision = dataclasses.replace(big.vision, width=8, depth=1, mlp_dim=8, num_heads=2, patch_size=4, image_size=8)
    cfg = dataclasses.replace(big, text=text, vision=vision, image_token_id=7)
    specs = nn.get_partition_spec(_model_init_shapes(cfg, layout))
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    return {path_key(p): tuple(spec) for p, spec in flat}


def _decoder_leaves(params: dict, stacked: bool) -> dict[str, Any]:
    """{sub-path within a layer: [L arrays] (stacked: one [L, ...] array)} of the decoder layers."""
    llm = params["llm"]
    if stacked:
        return {path_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(llm.pop("layers"))[0]}
    layers = [llm.pop(f"layers_{i}") for i in range(len([k for k in llm if k.startswith("layers_")]))]
    flat = [dict((path_key(p), x) for p, x in jax.tree_util.tree_flatten_with_path(layer)[0]) for layer in layers]
    return {key: [f[key] for f in flat] for key in flat[0]}


def to_layout(params: dict, src: Layout, dst: Layout) -> dict:
    """The same parameters in another decoder layout (see `backend.Layout`).

    Works in place on `params` (its decoder subtrees are replaced; `int4_bytes`, `int4_packed`: the
    language model's int4 values are cast or (un)packed). From stacked to per-layer, host
    (numpy) arrays are split into views and device arrays one program per stacked shape; a weight
    whose axes move (output-first) is transposed one layer at a time; each stacked array is dropped
    once split, so memory peaks at the model plus its largest stacked array. From per-layer, each
    layer's array is dropped as soon as it is moved: memory peaks at the model plus one layer's
    weight (what `weights.load(..., per_layer=True)` is for).
    """
    if src == dst:
        return params
    if src.int4_packed or src.int4_bytes != dst.int4_bytes:  # unpacked first: packing follows the axes
        _hold_int4(params, dataclasses.replace(dst, int4_packed=False))
    if dataclasses.replace(src, int4_bytes=dst.int4_bytes, int4_packed=dst.int4_packed) != dst:
        _move_axes(params, src, dst)
    if dst.int4_packed:
        _hold_int4(params, dst)
    return params


def _move_axes(params: dict, src: Layout, dst: Layout) -> None:
    """`to_layout`'s stacking and axis order, in place."""
    src_axes, dst_axes = axes_table(src), axes_table(dst)
    src_prefix = "llm/layers/" if src.stacked else "llm/layers_*/"
    dst_prefix = "llm/layers/" if dst.stacked else "llm/layers_*/"
    leaves = _decoder_leaves(params, src.stacked)
    out: dict[str, Any] = {}
    for sub in list(leaves):
        value, leaves[sub] = leaves[sub], None
        names = src_axes[src_prefix + sub][1:] if src.stacked else src_axes[src_prefix + sub]
        want = dst_axes[dst_prefix + sub][1:] if dst.stacked else dst_axes[dst_prefix + sub]
        perm = tuple(names.index(a) for a in want)
        identity = perm == tuple(range(len(perm)))
        if src.stacked and identity:
            layers = list(value) if isinstance(value, np.ndarray) else _unstack(value)
        elif src.stacked:
            layers = [_transpose(layer, perm) for layer in value]  # one layer per call: faster than all at once
        else:
            layers = value if identity else [_transpose(_take(value, i), perm) for i in range(len(value))]
        del value
        out[sub] = jnp.stack(layers) if dst.stacked else layers
    llm = params["llm"]
    if dst.stacked:
        llm["layers"] = nest({tuple(sub.split("/")): v for sub, v in out.items()})
    else:
        depth = len(next(iter(out.values())))
        for i in range(depth):
            llm[f"layers_{i}"] = nest({tuple(sub.split("/")): layers[i] for sub, layers in out.items()})


def _take(items: list, i: int) -> Any:
    """items[i], which the list then no longer holds (so it is freed once the caller drops it)."""
    item, items[i] = items[i], None
    return item


def _hold_int4(params: dict, dst: Layout) -> None:
    """The language model's int4 values (under int4 quantisation, every quantised weight of
    `params["llm"]`; SigLIP's are int8) held as `dst` says, in place: nibble-packed where a
    weight allows it (`dst.int4_packed`: along the last axis, so after the axes have moved), else
    in int8 arrays (`dst.int4_bytes`) or in jnp.int4."""
    quant = dst.quant
    if quant is None or quant.scheme != "int4":
        return
    dtype = jnp.int8 if dst.int4_bytes else jnp.int4

    def walk(node):
        if quantize.is_quantized(node):
            qvalue = quantize.values(node)
            packed = quantize.packed_where_possible({**node, quantize.QVALUE: qvalue}, _pack) if dst.int4_packed else None
            node[quantize.QVALUE] = qvalue.astype(dtype) if packed is None else packed[quantize.QVALUE]
            return
        for value in node.values():
            if isinstance(value, dict):
                walk(value)

    walk(params["llm"])


@jax.jit
def _pack(qvalue: jax.Array) -> jax.Array:
    return quantize.pack_int4(qvalue)


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """{("img", "head", "kernel"): x, ...} -> {"img": {"head": {"kernel": x}}, ...}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def detect_layout(params: dict, cfg: PaliGemmaConfig) -> Layout:
    """The decoder layout a parameter tree is in (quantisation included), from its keys and its
    projection shapes."""
    stacked = "layers" in params["llm"]
    quant = quantize.scheme_of(params)
    packed = quant is not None and any(quantize.is_packed(x.dtype) for x in jax.tree.leaves(params["llm"]))
    for out_first in (False, True):
        layout = Layout(stacked, out_first, quant, int4_packed=packed)
        want = abstract_params(cfg, layout=layout)
        if jax.tree.map(lambda x: tuple(x.shape), want) == jax.tree.map(lambda x: tuple(np.shape(x)), params):
            other = abstract_params(cfg, layout=Layout(stacked, not out_first, quant, int4_packed=packed))
            if jax.tree.map(lambda x: x.shape, other) == jax.tree.map(lambda x: x.shape, want):
                raise ValueError("the parameters' shapes fit both projection layouts: pass the layout explicitly")
            return layout
    raise ValueError("the parameter tree fits no layout of this config's model")


@jax.jit
def _unstack(x: jax.Array) -> list[jax.Array]:
    return list(x)  # one compiled program per stacked shape, not one per layer and shape


@functools.partial(jax.jit, static_argnums=1)
def _transpose(w: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    return jnp.transpose(w, perm)
