"""Training objective: next-token NLL on suffix tokens (prefix-LM), big_vision's reduction.

big_vision sums each example's suffix NLL and divides by that example's suffix length, then
averages over the batch ("example"). transformers averages over all suffix tokens of the batch
("token"). The two agree when every example has the same suffix length.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Reduction = Literal["example", "token"]


def suffix_nll(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    reduction: Reduction = "example",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mean next-token NLL. logits [B, T, V] (position t predicts token t+1), input_ids [B, T],
    loss_mask [B, T] True on the tokens to predict (suffix + EOS)."""
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
    if reduction == "token":
        return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    per_example = (nll * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    return per_example.mean()
