"""PaliGemma in Flax linen: SigLIP (+ projector) -> merge with text embeddings -> Gemma.

Parameters live under `img/...` (vision tower, `img/head` = projector) and `llm/...` (decoder), as
in big_vision. Three entry points share one decoder pass (`_decode`):
  `__call__`  full-sequence logits, no cache: the training / scoring path;
  `prefill`   image + prompt into a KV cache, logits of the last position only;
  `step`      new tokens (suffix) against the cache.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pali_jax.config import PaliGemmaConfig
from pali_jax.gemma import PROJECTION_IN_AXES, Gemma
from pali_jax.kv_cache import KVCache
from pali_jax.masks import prefix_lm_masks
from pali_jax.siglip import SigLIP

# HF counts RoPE positions from 1 (big_vision from 0): the same under RoPE up to rounding, and HF
# is the reference we match.
_FIRST_POSITION = 1


class PaliGemmaModel(nn.Module):
    """scan_layers=False: the decoder layers' weights one subtree each; out_first: their projections
    stored output axes first (see `Gemma`, `split_layers`)."""

    cfg: PaliGemmaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = True
    out_first: bool = False

    def setup(self):
        self.img = SigLIP(self.cfg.vision, self.cfg.text.width, self.dtype, self.remat)
        self.llm = Gemma(self.cfg.text, self.dtype, self.remat, self.scan_layers, self.out_first)

    def embed_image(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [-1, 1] -> image tokens [B, P, D] (projected, not scaled)."""
        return self.img(pixel_values)

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
        c = self.cfg.text
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
        masks = prefix_lm_masks(slots, prefix, kv_prefix, kv_valid, c.sliding_window)
        h, kv = self.llm(x, positions, masks, kv, start)
        if cache is not None:
            cache = cache.advance(kv[0], kv[1], valid)
        return h, cache

    def __call__(self, pixel_values, input_ids, token_type_ids=None, attention_mask=None) -> jax.Array:
        """Logits [B, T, V] float32 for every position (no cache).

        token_type_ids None: everything is prefix (bidirectional); attention_mask None: no padding.
        """
        prefix, valid = _types_and_mask(input_ids, token_type_ids, attention_mask)
        x = self.embed_inputs(input_ids, self.embed_image(pixel_values))
        h, _ = self._decode(x, prefix, valid, None)
        return self.llm.logits(h)

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


def abstract_params(cfg: PaliGemmaConfig, dtype: jnp.dtype = jnp.float32):
    """The model's parameters as `jax.ShapeDtypeStruct`s, from `jax.eval_shape` of its init (no memory)."""
    size = cfg.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(PaliGemmaModel(cfg).init, jax.random.PRNGKey(0), pixels, ids)["params"]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)


def split_layers(params: dict, out_first: bool = False) -> dict:
    """Stacked decoder weights (`llm/layers/...`, [L, ...]) -> one subtree per layer (`llm/layers_0/...`,
    ...): the parameters of `PaliGemmaModel(scan_layers=False, out_first=out_first)`.

    Works in place on `params`: host (numpy) arrays are split into views; device arrays, and every
    projection weight when `out_first` (moved to [*out, *in] by XLA, see `gemma.PROJECTION_IN_AXES`),
    are copied, each stacked one dropped once split, so memory peaks at the model plus its largest
    stacked array.
    """
    llm = params["llm"]
    keyed, treedef = jax.tree_util.tree_flatten_with_path(llm.pop("layers"))
    per_layer = []
    for j, (keys, _) in enumerate(keyed):
        stacked, keyed[j] = keyed[j][1], None
        in_axes = PROJECTION_IN_AXES.get(keys[-1].key) if out_first else None
        if in_axes is not None:  # one layer per call: twice as fast as all layers in one program
            per_layer.append([_to_out_first(layer, in_axes) for layer in stacked])
        else:
            per_layer.append(list(stacked) if isinstance(stacked, np.ndarray) else _unstack(stacked))
        del stacked
    for i, layer in enumerate(zip(*per_layer)):
        llm[f"layers_{i}"] = jax.tree.unflatten(treedef, layer)
    return params


@jax.jit
def _unstack(x: jax.Array) -> list[jax.Array]:
    return list(x)  # one compiled program per stacked shape, not one per layer and shape


@functools.partial(jax.jit, static_argnums=1)
def _to_out_first(w: jax.Array, in_axes: int) -> jax.Array:
    """[*in, *out] -> [*out, *in]."""
    return jnp.moveaxis(w, tuple(range(in_axes)), tuple(range(-in_axes, 0)))
