"""The prefix-LM attention rule of PaliGemma, as boolean masks built on demand.

One rule: a query sees a key iff the key holds a real token and either the key is not after the
query (causal) or both are prefix tokens (image, `<bos>`, prompt, `"\\n"`: bidirectional). Gemma 2's
sliding-window layers apply HF's variant: the window bounds the causal part only, so the
bidirectional prefix block ignores it, and a suffix token sees the last `window` slots (itself
included).

Slots index positions in the key sequence (the KV cache, or the input itself without a cache).
`PrefixLM` holds the rule's inputs, O(T + S), and builds the [B, T, S'] mask of any span of key
slots, so attention over a long cache never materialises a mask of the whole cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

NO_WINDOW = 1 << 30  # a window no sequence reaches


@flax.struct.dataclass
class PrefixLM:
    q_slots: jax.Array  # [T] int32: each query's slot
    q_prefix: jax.Array  # [B, T] bool: the query is a prefix token (type 0)
    kv_prefix: jax.Array  # [B, S] bool
    kv_valid: jax.Array  # [B, S] bool: the key slot holds a real token

    def mask(self, window: jax.Array | int = NO_WINDOW, start: jax.Array | int = 0, size: int | None = None) -> jax.Array:
        """[B, T, size] bool: which of key slots start .. start + size - 1 each query sees.

        window: the sliding window of this layer (NO_WINDOW: none); may be traced.
        """
        size = self.kv_valid.shape[1] if size is None else size
        kv_slots = start + jnp.arange(size)
        valid = jax.lax.dynamic_slice_in_dim(self.kv_valid, start, size, axis=1)[:, None, :]
        kv_prefix = jax.lax.dynamic_slice_in_dim(self.kv_prefix, start, size, axis=1)[:, None, :]
        distance = self.q_slots[:, None] - kv_slots[None, :]  # [T, size]
        in_window = (distance >= 0) & (distance < window)
        block = self.q_prefix[:, :, None] & kv_prefix  # [B, T, size]
        return valid & (in_window[None] | block)

