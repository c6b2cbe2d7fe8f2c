"""Scaled dot-product attention with grouped kv heads, Gemma 2's soft cap and the prefix-LM rule.

`attend` computes `softmax(mask(cap(q k^T * scale))) v` with logits and softmax in float32, as
transformers' eager Gemma does. Two ways to run it:

* over all S key slots at once (training, short caches); with `kernel="cudnn"` (the policy's
  choice on CUDA in half precision without a soft cap: `backend.Policy.attention_kernel`) through
  cuDNN's fused kernel, `jax.nn.dot_product_attention(implementation="cudnn")`, else einsums;
* over a long KV cache, in chunks of `CHUNK` slots up to the slots in use, with a running
  (online) softmax: a decode step then costs what the tokens written so far cost, not what the
  cache's capacity would.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from pali_jax.backend import AttentionKernel
from pali_jax.masks import PrefixLM

# Key slots per chunk of the cached path. A cache of at most this many slots is attended whole.
CHUNK = 256
_MASKED = jnp.finfo(jnp.float32).min


def _logits(q, k, scale, softcap):
    """q [B, T, K, G, H], k [B, S, K, H] -> float32 logits [B, K, G, T, S], soft-capped."""
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rule: PrefixLM,
    window: jax.Array | int,
    *,
    scale: float,
    softcap: float | None,
    kernel: AttentionKernel = "einsum",
    used: jax.Array | None = None,
) -> jax.Array:
    """q [B, T, N, H], k / v [B, S, K, H] -> [B, T, N, H] in q's dtype.

    rule + window give the mask; `used` (traced): the key slots 0 .. used - 1 that can hold
    tokens (a cache's written slots); None: all S.
    """
    if used is not None and k.shape[1] > CHUNK:
        return _attend_chunked(q, k, v, rule, window, scale, softcap, used)
    if kernel == "cudnn" and softcap is None:
        mask = rule.mask(window)[:, None]  # [B, 1, T, S]
        try:
            return jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale, implementation="cudnn"
            )
        except NotImplementedError as e:  # a shape this GPU's cuDNN rejects (head dim 256 before Hopper)
            warnings.warn(f"cuDNN attention does not apply here ({e}); running the einsum form", stacklevel=2)
    return mix(probabilities(q, k, rule, window, scale=scale, softcap=softcap), v, q.dtype)


def probabilities(
    q: jax.Array, k: jax.Array, rule: PrefixLM, window: jax.Array | int, *, scale: float, softcap: float | None
) -> jax.Array:
    """q [B, T, N, H], k [B, S, K, H] -> the post-softmax attention [B, K, G, T, S] float32 over all
    S slots (query head n = k * G + g reads kv head k). Masked slots get exactly 0, except in the
    row of a query that sees no slot at all (a padding position), which is uniform."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    mask = rule.mask(window)  # [B, T, S]
    logits = _logits(q.reshape(b, t, kv_heads, n // kv_heads, h), k.astype(q.dtype), scale, softcap)
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    return jax.nn.softmax(logits, axis=-1)


def mix(probs: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """probs [B, K, G, T, S], v [B, S, K, H] -> the attended values [B, T, N, H] in `dtype`."""
    b, kv_heads, g, t, _ = probs.shape
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(dtype), v.astype(dtype))
    return out.reshape(b, t, kv_heads * g, v.shape[-1])


def _attend_chunked(q, k, v, rule, window, scale, softcap, used):
    """`attend` over ceil(used / CHUNK) chunks of key slots, with a running max and sum."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    num_chunks = (used + CHUNK - 1) // CHUNK

    def body(c, carry):
        top, total, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H] float32
        start = jnp.minimum(c * CHUNK, s - CHUNK)  # the last chunk may overlap the one before it
        k_c = jax.lax.dynamic_slice_in_dim(k, start, CHUNK, axis=1).astype(q.dtype)
        v_c = jax.lax.dynamic_slice_in_dim(v, start, CHUNK, axis=1).astype(q.dtype)
        fresh = start + jnp.arange(CHUNK) >= c * CHUNK  # slots an earlier chunk did not cover
        mask = rule.mask(window, start, CHUNK) & fresh  # [B, T, CHUNK]
        logits = jnp.where(mask[:, None, None], _logits(q, k_c, scale, softcap), _MASKED)
        new_top = jnp.maximum(top, logits.max(axis=-1))
        weights = jnp.exp(logits - new_top[..., None])  # [B, K, G, T, CHUNK]
        rescale = jnp.exp(top - new_top)
        total = total * rescale + weights.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum(
            "BKGTS,BSKH->BKGTH", weights.astype(q.dtype), v_c, preferred_element_type=jnp.float32
        )
        return new_top, total, acc

    shape = (b, kv_heads, n // kv_heads, t)
    init = (jnp.full(shape, _MASKED), jnp.zeros(shape), jnp.zeros((*shape, h)))
    _, total, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / total[..., None]  # [B, K, G, T, H]
    return jnp.einsum("BKGTH->BTKGH", out).reshape(b, t, n, h).astype(q.dtype)
