"""The Gemma decoder (Gemma 1 and Gemma 2) in Flax linen.

Axis letters are those of `layers.py`. Parameter names follow big_vision / google-deepmind/gemma
(`embedder/input_embedding`, `attn/q_einsum` [D, N, H], `attn/kv_einsum` [D, 2, K, H],
`attn/attn_vec_einsum` [N, H, D], `mlp/gating_einsum` [D, 2, F], `mlp/linear` [F, D],
`pre_attention_norm`, ...): every projection contracts its weight's leading axes, so that it is one
2-D matmul. How the weights are stored (stacked under `nn.scan` or one subtree per layer; input or
output axes first) is the `layout`'s business (`backend.Layout`), and how each product and the
attention run on the platform is the `policy`'s (`backend.Policy`); the math is the same.

Numerics follow transformers' Gemma / Gemma2: norms, attention logits and softmax in float32,
everything else in the activation dtype.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pali_jax import attention, quantize
from pali_jax.backend import Layout, Policy, project
from pali_jax.config import GemmaConfig
from pali_jax.intermediates import INTERMEDIATES
from pali_jax.layers import Einsum, declare_weight, default_init, product, shared_scope
from pali_jax.masks import NO_WINDOW, PrefixLM
from pali_jax.quantize import Quantization

LayerKV = tuple[jax.Array, jax.Array]  # one layer's cache (k, v) [B, S, K, H]


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * (1 + scale)` in float32; the stored scale is zero-centred."""

    eps: float
    axis: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis,))
        scale = self.param("scale", init, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
    """The tied token embedding [V, D]: ids -> scaled vectors, and vectors -> vocabulary logits.
    Quantised (`quant`), it is quantised by rows (the logits contract D), and a lookup
    dequantises only the rows it reads."""

    vocab_size: int
    width: int
    dtype: jnp.dtype = jnp.float32
    policy: Policy = Policy()
    quant: Quantization | None = None
    packed: bool = False  # `Layout.int4_packed`

    def setup(self):
        self.input_embedding = declare_weight(self, "input_embedding", default_init, (self.vocab_size, self.width),
                                              ("vocab", "embed"), (1,), self.quant, self.packed)

    def encode(self, ids: jax.Array) -> jax.Array:
        """[B, T] -> [B, T, D], scaled by sqrt(D) rounded to the activation dtype as HF does."""
        if self.quant is None:
            x = jnp.take(self.input_embedding, ids, axis=0).astype(self.dtype)
        else:
            rows = {k: jnp.take(v, ids, axis=0) for k, v in self.input_embedding.items()}
            x = quantize.dequantize(rows, self.dtype)
        return x * jnp.asarray(math.sqrt(self.width), self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V]: the table is [V, D], an output-first weight in every layout."""
        return product(lambda x, table: project(x, table, 1, True, self.policy), x, self.input_embedding, self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding in the split-halves layout; x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def write(layer_cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes `new` [B, T, K, H] into one layer's cache [B, S, K, H] at slot `index`."""
    return jax.lax.dynamic_update_slice(layer_cache, new.astype(layer_cache.dtype), (0, index, 0, 0))


class _Projections(nn.Module):
    """What a sublayer built of `Einsum` projections is given: its config, dtype, weight layout and
    backend policy."""

    cfg: GemmaConfig
    dtype: jnp.dtype = jnp.float32
    layout: Layout = Layout()
    policy: Policy = Policy()


class Attention(_Projections):
    """Multi-query / grouped-query attention with RoPE, soft-capping and an optional cache."""

    def setup(self):
        c, dt, lay, pol = self.cfg, self.dtype, self.layout, self.policy
        d, n, k, h = c.width, c.num_heads, c.num_kv_heads, c.head_dim
        shared_scope(
            self,
            q_proj=Einsum("q_einsum", "BTD,DNH->BTNH", (d, n, h), ("embed", "q_heads", "head_dim"), lay, dt, pol),
            kv_proj=Einsum(
                "kv_einsum", "BTD,DCKH->BTCKH", (d, 2, k, h), ("embed", "pair", "kv_heads", "head_dim"), lay, dt, pol
            ),
            out_proj=Einsum("attn_vec_einsum", "BTNH,NHD->BTD", (n, h, d), ("q_heads", "head_dim", "embed"), lay, dt, pol),
        )

    def __call__(self, x, positions, rule: PrefixLM, window, layer_kv: LayerKV | None, write_index):
        """x [B, T, D], positions [B, T]; rule and window: the mask; layer_kv: this layer's cache or None.

        Returns ([B, T, D], the updated (k, v) or None).
        """
        c = self.cfg
        q = apply_rope(self.q_proj(x), positions, c.rope_base)  # [B, T, N, H]
        kv = self.kv_proj(x)  # [B, T, 2, K, H]
        k, v = apply_rope(kv[:, :, 0], positions, c.rope_base), kv[:, :, 1]
        used = None
        if layer_kv is not None:
            k, v = write(layer_kv[0], k, write_index), write(layer_kv[1], v, write_index)
            layer_kv, used = (k, v), write_index + x.shape[1]
        if self.is_mutable_collection(INTERMEDIATES):  # asked to record: the whole matrix, never chunked
            probs = attention.probabilities(q, k, rule, window, scale=c.query_scale, softcap=c.attn_logit_softcap)
            b, kv_heads, g, t, s = probs.shape
            self.sow(INTERMEDIATES, "attention", probs.reshape(b, kv_heads * g, t, s))  # [B, N, T, S]
            out = attention.mix(probs, v, q.dtype)
        else:
            kernel = self.policy.attention_kernel(q.dtype, c.attn_logit_softcap)
            out = attention.attend(
                q, k, v, rule, window, scale=c.query_scale, softcap=c.attn_logit_softcap, kernel=kernel, used=used
            )
        return self.out_proj(out), layer_kv


class FeedForward(_Projections):
    """GeGLU: `linear(gelu(x @ gate) * (x @ up))`."""

    def setup(self):
        c, dt, lay, pol = self.cfg, self.dtype, self.layout, self.policy
        shared_scope(
            self,
            gating=Einsum("gating_einsum", "BTD,DCF->BTCF", (c.width, 2, c.mlp_dim), ("embed", "pair", "mlp"), lay, dt, pol),
            down=Einsum("linear", "BTF,FD->BTD", (c.mlp_dim, c.width), ("mlp", "embed"), lay, dt, pol),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        gating = self.gating(x)  # [B, T, 2, F]
        hidden = nn.gelu(gating[:, :, 0], approximate=self.cfg.gelu_approximate) * gating[:, :, 1]
        return self.down(hidden)


class Block(nn.Module):
    """One decoder layer. Gemma 2 adds norms after attention and after the MLP (`post_norms`)."""

    cfg: GemmaConfig
    dtype: jnp.dtype = jnp.float32
    layout: Layout = Layout()
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, positions, rule: PrefixLM, is_sliding, layer_kv, write_index):
        """Under nn.scan, x is the carry and is_sliding [] / layer_kv are this layer's slices."""
        c = self.cfg
        window = NO_WINDOW if c.sliding_window is None else jnp.where(is_sliding, c.sliding_window, NO_WINDOW)
        h = RMSNorm(c.rms_norm_eps, name="pre_attention_norm")(x)
        attn = Attention(c, self.dtype, self.layout, self.policy, name="attn")
        h, layer_kv = attn(h, positions, rule, window, layer_kv, write_index)
        if c.post_norms:
            h = RMSNorm(c.rms_norm_eps, name="post_attention_norm")(h)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, name="pre_ffw_norm")(x)
        h = FeedForward(c, self.dtype, self.layout, self.policy, name="mlp")(h)
        if c.post_norms:
            h = RMSNorm(c.rms_norm_eps, name="post_ffw_norm")(h)
        x = x + h
        self.sow(INTERMEDIATES, "output", x)
        return x, layer_kv


class Gemma(nn.Module):
    """The decoder stack: embedder, L blocks, final norm, tied logits.

    With a stacked layout the blocks run under `nn.scan` (`layers/...`, every parameter [L, ...]);
    otherwise each block has its own weights (`layers_0/...`, ...). The cache follows: (k, v)
    [L, B, S, K, H] when stacked, else a tuple of L arrays [B, S, K, H] each, so that a decode step
    writes every layer's cache in place. `remat` recomputes each layer's activations in the
    backward pass (training memory).
    """

    cfg: GemmaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    layout: Layout = Layout()
    policy: Policy = Policy()

    def setup(self):
        c = self.cfg
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        self.embedder = Embedder(c.vocab_size, c.width, self.dtype, self.policy, self.layout.quant, self.layout.int4_packed)
        if self.layout.stacked:
            self.layers = nn.scan(
                block,
                # LoRA adapters (lora.py) and recorded intermediates are stacked like the weights
                variable_axes={"params": 0, "lora": 0, INTERMEDIATES: 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                length=c.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dtype, self.layout, self.policy)
        else:
            self.layers = [block(c, self.dtype, self.layout, self.policy) for _ in range(c.depth)]  # layers_0, ...
        self.final_norm = RMSNorm(c.rms_norm_eps)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embedder.encode(ids)

    def __call__(self, x, positions, rule: PrefixLM, kv, write_index=0):
        """x [B, T, D] embedded inputs; rule: the attention mask's inputs; kv: the cache's (k, v)
        (see class docstring) or None. Returns (final-normed hidden states [B, T, D], updated kv)."""
        is_sliding = jnp.asarray(self.cfg.layer_is_sliding, bool)  # [L]
        self.sow(INTERMEDIATES, "embeddings", x)
        if self.layout.stacked:
            x, kv = self.layers(x, positions, rule, is_sliding, kv, write_index)
        else:
            updated = []
            for i, layer in enumerate(self.layers):
                x, layer_kv = layer(x, positions, rule, is_sliding[i], None if kv is None else (kv[0][i], kv[1][i]),
                                    write_index)
                updated.append(layer_kv)
            kv = None if kv is None else tuple(zip(*updated))
        h = self.final_norm(x)
        self.sow(INTERMEDIATES, "last_hidden_state", h)
        return h, kv

    def logits(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] float32, with Gemma 2's final soft cap where configured."""
        logits = self.embedder.decode(x).astype(jnp.float32)
        if self.cfg.final_logit_softcap is not None:
            cap = self.cfg.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits
