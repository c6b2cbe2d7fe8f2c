"""The prefix-LM rule as exact boolean tables, and chunked attention over a cache against whole attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali_jax import attention
from pali_jax.masks import PrefixLM

T, F = True, False


def test_prefix_lm_mask_table():
    """Row 0: two prefix tokens, two suffix tokens. Row 1: one left pad, two prefix, one suffix."""
    rule = PrefixLM(
        q_slots=jnp.arange(4),
        q_prefix=jnp.array([[T, T, F, F], [F, T, T, F]]),
        kv_prefix=jnp.array([[T, T, F, F], [F, T, T, F]]),
        kv_valid=jnp.array([[T, T, T, T], [F, T, T, T]]),
    )
    want = np.array([
        [[T, T, F, F],
         [T, T, F, F],
         [T, T, T, F],
         [T, T, T, T]],
        [[F, F, F, F],  # a pad query sees nothing but itself would be a pad: nothing
         [F, T, T, F],
         [F, T, T, F],
         [F, T, T, T]],
    ])
    np.testing.assert_array_equal(np.asarray(rule.mask()), want)


def test_sliding_window_bounds_the_causal_part_only():
    """Window 2: a suffix query sees itself and the slot before; the prefix block stays whole."""
    rule = PrefixLM(
        q_slots=jnp.arange(5),
        q_prefix=jnp.array([[T, T, T, F, F]]),
        kv_prefix=jnp.array([[T, T, T, F, F]]),
        kv_valid=jnp.ones((1, 5), bool),
    )
    want = np.array([[
        [T, T, T, F, F],
        [T, T, T, F, F],
        [T, T, T, F, F],
        [F, F, T, T, F],
        [F, F, F, T, T],
    ]])
    np.testing.assert_array_equal(np.asarray(rule.mask(window=2)), want)
    # A span of slots is the same as the matching columns of the whole mask.
    np.testing.assert_array_equal(np.asarray(rule.mask(2, start=1, size=3)), want[:, :, 1:4])


@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("used", [1, 255, 256, 300, 700])
def test_chunked_attention_equals_whole_attention(softcap, used):
    """A cache of 700 slots, `used` of them written: the chunked path (which reads only the written
    chunks, the last one overlapping its neighbour) gives the whole-cache result."""
    b, t, n, k, h, s = 2, 3, 4, 2, 8, 700
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kc = jax.random.normal(keys[1], (b, s, k, h))
    vc = jax.random.normal(keys[2], (b, s, k, h))
    valid = (jnp.arange(s) < used)[None].repeat(b, 0) & (jax.random.uniform(keys[3], (b, s)) > 0.1)
    valid = valid.at[:, used - 1].set(True)
    rule = PrefixLM(q_slots=used - t + jnp.arange(t), q_prefix=jnp.zeros((b, t), bool),
                    kv_prefix=jnp.zeros((b, s), bool), kv_valid=valid)
    whole = attention.attend(q, kc, vc, rule, 64, scale=0.3, softcap=softcap)
    chunked = attention.attend(q, kc, vc, rule, 64, scale=0.3, softcap=softcap, used=jnp.int32(used))
    real = np.asarray(rule.mask(64)).any(-1)  # query rows that see at least one key
    np.testing.assert_allclose(np.asarray(chunked)[real], np.asarray(whole)[real], rtol=1e-5, atol=1e-6)
