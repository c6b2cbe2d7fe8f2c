"""The prefix-LM attention rule of PaliGemma, as boolean masks.

One rule: a query sees a key iff the key holds a real token and either the key is not after the
query (causal) or both are prefix tokens (image, `<bos>`, prompt, `"\\n"`: bidirectional). Gemma 2's
sliding-window layers apply HF's variant: the window bounds the causal part only, so the
bidirectional prefix block ignores it, and a suffix token sees the last `window` slots (itself
included).

Slots index positions in the key sequence (the KV cache, or the input itself without a cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prefix_lm_masks(
    q_slots: jax.Array,
    q_prefix: jax.Array,
    kv_prefix: jax.Array,
    kv_valid: jax.Array,
    window: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Masks [B, T, S] for full-attention layers and for sliding-window layers.

    q_slots [T]: each query's slot; q_prefix [B, T] and kv_prefix [B, S]: token type 0;
    kv_valid [B, S]: the key is a real token. With `window` None both masks are the same.
    """
    kv_slots = jnp.arange(kv_valid.shape[1])
    distance = q_slots[:, None] - kv_slots[None, :]  # [T, S]
    causal = distance >= 0
    block = q_prefix[:, :, None] & kv_prefix[:, None, :]  # [B, T, S]
    valid = kv_valid[:, None, :]
    full = valid & (causal[None] | block)
    if window is None:
        return full, full
    in_window = causal & (distance < window)
    return full, valid & (in_window[None] | block)
