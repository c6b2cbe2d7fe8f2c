"""The decoder's KV cache: an explicit pytree, written in place by `dynamic_update_slice`.

Rows of a batch share one write index: prompts are left-padded, so every row's next token lands in
the same slot. What differs per row is which slots hold real tokens (`valid`) and how many real
tokens the row has seen (`positions`: RoPE positions count real tokens only).

Keys and values follow the decoder's layout (`backend.Layout.stacked`): one [L, B, S, K, H] array
each for stacked layers (what `nn.scan` carries), or a tuple of L arrays [B, S, K, H] for layers
run one by one, so that a decode step updates each layer's cache in place instead of restacking it.
"""

from __future__ import annotations

from typing import Union

import flax.struct
import jax
import jax.numpy as jnp

from pali_jax.config import GemmaConfig

Layers = Union[jax.Array, tuple[jax.Array, ...]]


@flax.struct.dataclass
class KVCache:
    k: Layers  # keys after RoPE: [L, B, S, K, H], or L x [B, S, K, H]
    v: Layers
    valid: jax.Array  # [B, S] bool: the slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the next slot to write
    positions: jax.Array  # [B] int32: real tokens written per row (its next token's position, from 0)

    @classmethod
    def init(
        cls, cfg: GemmaConfig, batch: int, length: int, dtype: jnp.dtype = jnp.float32, stacked: bool = True
    ) -> "KVCache":
        """An empty cache of `length` slots for `batch` rows."""
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        if stacked:
            k = v = jnp.zeros((cfg.depth, *shape), dtype)
        else:
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.depth)) for _ in range(2))
        return cls(
            k=k,
            v=v,
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
            positions=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def length(self) -> int:
        """Number of slots, S."""
        return self.valid.shape[1]

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    def advance(self, k: Layers, v: Layers, token_valid: jax.Array) -> "KVCache":
        """The cache after writing T tokens: the layers' new keys/values and the tokens' validity
        [B, T] (False for padding)."""
        num_new = token_valid.shape[1]
        return self.replace(
            k=k,
            v=v,
            valid=jax.lax.dynamic_update_slice(self.valid, token_valid, (0, self.index)),
            index=self.index + num_new,
            positions=self.positions + token_valid.sum(axis=1, dtype=jnp.int32),
        )

    def map_rows(self, fn) -> "KVCache":
        """The cache with `fn` applied along the row axis of every per-row array (`fn` takes an
        array and the axis of its rows): to reorder rows (beam search) or repeat them."""
        row_axis = 1 if self.stacked else 0
        return self.replace(
            k=jax.tree.map(lambda x: fn(x, row_axis), self.k),
            v=jax.tree.map(lambda x: fn(x, row_axis), self.v),
            valid=fn(self.valid, 0),
            positions=fn(self.positions, 0),
        )
