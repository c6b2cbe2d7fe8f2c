"""Token samplers for autoregressive decoding.

Everything here is a pure function of ``(logits, key, params)`` so it can run
inside a jitted ``lax.while_loop`` decode. The sampling parameters are pytree
*leaves* (traced scalars), not static arguments: changing temperature, top-k or
top-p between calls reuses the same compiled executable.

Pipeline of :func:`sample` for logits ``[B, V]``:

1. ``temperature == 0`` -> greedy: ``jnp.argmax(logits, -1)``, bit-for-bit.
   Chosen with ``lax.cond`` so the sort below is skipped entirely when greedy.
2. Otherwise divide by temperature, then sort each row once (descending) and do
   all filtering in sorted ("rank") space:

   * top-k keeps ranks ``< k``. Because ``k`` is a traced value we cannot use
     ``lax.top_k`` (static ``k``); a rank mask over the full sort works for any
     ``k``. Ties at the k-th value are broken by token id (lower id wins), so
     exactly ``min(k, V)`` tokens survive, never more.
   * top-p (nucleus) is computed on the tempered, top-k-renormalised
     distribution: keep the smallest prefix of ranks whose cumulative
     probability reaches ``top_p``. A rank is kept iff the probability mass
     strictly *before* it is ``< top_p``, so the token that crosses the
     threshold is kept and the one after it is dropped; rank 0 is always kept.
   * categorical draw over the surviving ranks, mapped back to token ids.

Randomness: ``key`` is one key per decode step (split or ``fold_in`` the step
index outside). Row ``b`` draws with ``fold_in(key, b)``, so a row's token
depends only on ``(key, b, logits[b], params)`` -- not on the batch size or on
the other rows. Same key and inputs -> same tokens.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from pali_jax.errors import UserError

Array = jax.Array


@flax.struct.dataclass
class SamplingParams:
    """Sampling knobs as traced scalars; build with :meth:`make` to validate.

    ``temperature`` f32[]: 0 means greedy. ``top_k`` i32[]: 0 means off.
    ``top_p`` f32[]: 1.0 means off.
    """

    temperature: Array
    top_k: Array
    top_p: Array

    @classmethod
    def make(
        cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
    ) -> SamplingParams:
        """Validates concrete Python values and packs them as fixed-dtype arrays.

        Fixed (non-weak) dtypes matter: a weak-typed leaf has a different
        abstract type than a strong one, which would trigger a recompile.
        """
        temperature, top_p = float(temperature), float(top_p)
        # `not (x >= 0)` also rejects NaN.
        if not temperature >= 0.0 or math.isinf(temperature):
            raise UserError(f"temperature must be finite and >= 0, got {temperature}")
        if isinstance(top_k, bool) or int(top_k) != top_k:
            raise UserError(f"top_k must be an integer, got {top_k!r}")
        if top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
        return cls(
            temperature=jnp.asarray(temperature, jnp.float32),
            top_k=jnp.asarray(int(top_k), jnp.int32),
            top_p=jnp.asarray(top_p, jnp.float32),
        )

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls.make()


def sample(logits: Array, key: Any, params: SamplingParams) -> Array:
    """Draws one token per row. logits [B, V] -> tokens [B] int32.

    ``key`` may be a raw ``PRNGKey`` or a typed ``jax.random.key``.
    """
    return lax.cond(
        params.temperature > 0,
        lambda: _sample_stochastic(logits.astype(jnp.float32), key, params),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
    )


def sample_rows(logits: Array, keys: Array, params: SamplingParams) -> Array:
    """`sample` with one key per row: logits [B, V], keys [B, 2] -> tokens [B] int32. The
    parameters' leaves are scalars or [B] (each row its own settings: a server's requests).

    Row b draws exactly what `sample` draws for a batch holding that row alone with key
    ``keys[b]`` and row b's settings, so a row's tokens do not depend on which row of the batch it
    sits in (continuous batching moves answers between rows). Rows with temperature 0 are greedy.
    """
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, logits.shape[:1]), params)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        one = lambda row, key, p: _sample_stochastic(row[None].astype(jnp.float32), key, p)[0]
        return jnp.where(params.temperature > 0, jax.vmap(one)(logits, keys, params), greedy)

    return lax.cond(jnp.any(params.temperature > 0), draw, lambda: greedy)


def _sample_stochastic(logits: Array, key: Any, params: SamplingParams) -> Array:
    batch = logits.shape[0]
    # Under vmap over params, lax.cond evaluates both branches; keep this one
    # finite for temperature 0 even though its result is then discarded.
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    scaled = logits / temperature  # [B, V]

    token_ids = lax.broadcasted_iota(jnp.int32, scaled.shape, 1)  # [B, V]
    # One stable sort carrying the ids along; sorting the negation gives a
    # descending order in which equal logits keep ascending token ids.
    neg_sorted, sorted_ids = lax.sort(
        (-scaled, token_ids), dimension=1, num_keys=1, is_stable=True
    )
    sorted_logits = _filter_sorted(-neg_sorted, params)  # [B, V]

    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        key, jnp.arange(batch, dtype=jnp.uint32)
    )
    ranks = jax.vmap(jax.random.categorical)(row_keys, sorted_logits)  # [B]
    tokens = jnp.take_along_axis(sorted_ids, ranks[:, None], axis=1)[:, 0]
    return tokens.astype(jnp.int32)


def _filter_sorted(sorted_logits: Array, params: SamplingParams) -> Array:
    """Top-k then top-p on rows sorted descending; dropped ranks become -inf.

    sorted_logits [B, V] -> [B, V].
    """
    vocab = sorted_logits.shape[-1]
    rank = lax.broadcasted_iota(jnp.int32, sorted_logits.shape, 1)  # [B, V]

    k = jnp.where(params.top_k > 0, params.top_k, vocab)
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)

    probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, V]
    # Exclusive cumsum via shift rather than `cumsum - probs`, which can round
    # the mass before rank 0 to a tiny non-zero value.
    mass_before = jnp.cumsum(probs, axis=-1)[:, :-1]  # [B, V-1]
    mass_before = jnp.pad(mass_before, ((0, 0), (1, 0)))  # [B, V]
    # top_p == 1 must be an exact no-op, but in f32 the cumulative mass can
    # round to 1.0 before the low-probability tail, so bypass the comparison.
    keep = (mass_before < params.top_p) | (params.top_p >= 1.0) | (rank == 0)
    return jnp.where(keep, sorted_logits, -jnp.inf)


def token_logprobs(logits: Array, tokens: Array) -> Array:
    """log p(token) under the raw (unfiltered, temperature-1) distribution.

    logits [..., V], tokens [...] int -> [...] float32. Computed in float32 so
    bf16 logits do not lose precision in the normaliser.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
