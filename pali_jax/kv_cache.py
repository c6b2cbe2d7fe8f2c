"""The decoder's KV cache: an explicit pytree, written in place by `dynamic_update_slice`.

Rows of a batch share one write index: prompts are left-padded, so every row's next token lands in
the same slot. What differs per row is which slots hold real tokens (`valid`) and how many real
tokens the row has seen (`positions`: RoPE positions count real tokens only).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pali_jax.config import GemmaConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H] keys after RoPE
    v: jax.Array  # [L, B, S, K, H]
    valid: jax.Array  # [B, S] bool: the slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the next slot to write
    positions: jax.Array  # [B] int32: real tokens written per row (its next token's position, from 0)

    @classmethod
    def init(cls, cfg: GemmaConfig, batch: int, length: int, dtype: jnp.dtype = jnp.float32) -> "KVCache":
        """An empty cache of `length` slots for `batch` rows."""
        shape = (cfg.depth, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
            positions=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def length(self) -> int:
        """Number of slots, S."""
        return self.valid.shape[1]

    def advance(self, k: jax.Array, v: jax.Array, token_valid: jax.Array) -> "KVCache":
        """The cache after writing T tokens: new per-layer keys/values [L, B, S, K, H] and the
        tokens' validity [B, T] (False for padding)."""
        num_new = token_valid.shape[1]
        return self.replace(
            k=k,
            v=v,
            valid=jax.lax.dynamic_update_slice(self.valid, token_valid, (0, self.index)),
            index=self.index + num_new,
            positions=self.positions + token_valid.sum(axis=1, dtype=jnp.int32),
        )


def write(layer_cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes `new` [B, T, K, H] into one layer's cache [B, S, K, H] at slot `index`."""
    return jax.lax.dynamic_update_slice(layer_cache, new.astype(layer_cache.dtype), (0, index, 0, 0))
