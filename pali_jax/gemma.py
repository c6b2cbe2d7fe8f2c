"""The Gemma decoder (Gemma 1 and Gemma 2) in Flax linen.

Einsum axis letters, used throughout the package:
  B batch, T query length, S key length (cache slots), D width, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, F MLP width, V vocab, L layers.

Parameter names follow big_vision / google-deepmind/gemma (`embedder/input_embedding`,
`attn/q_einsum`, `attn/kv_einsum`, `attn/attn_vec_einsum`, `mlp/gating_einsum`, `mlp/linear`,
`pre_attention_norm`, ...). Layouts put the contracted axes first and keep the rest contiguous
(q [D, N, H], kv [D, 2, K, H], out [N, H, D], gating [D, 2, F], linear [F, D]; big_vision has
[N, D, H], [2, K, D, H], [2, D, F]), so that every projection is ONE 2-D matmul (`_project`).
Layers run under `nn.scan` (every layer parameter carries a leading [L] axis) or, for inference,
one by one on their own weights (`Gemma.scan_layers`), which may then hold the projections output
axes first (`Gemma.out_first`, for bfloat16 on CPU; see `weights_out_first`). Numerics follow transformers'
Gemma/Gemma2 (see shared facts): norms, attention logits and softmax in float32, everything else
in the activation dtype.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pali_jax import kv_cache, lora
from pali_jax.config import GemmaConfig

_init = nn.initializers.normal(stddev=0.02)

# How many leading axes of each layer projection weight are its inputs, in the checkpoint layout
# [*in, *out]; `Gemma.out_first` layers hold the same weights as [*out, *in].
PROJECTION_IN_AXES = {"q_einsum": 1, "kv_einsum": 1, "attn_vec_einsum": 2, "gating_einsum": 1, "linear": 1}


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * (1 + scale)` in float32; the stored scale is zero-centred."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
    """The tied token embedding: ids -> scaled vectors, and vectors -> vocabulary logits."""

    vocab_size: int
    width: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.input_embedding = self.param("input_embedding", _init, (self.vocab_size, self.width))

    def encode(self, ids: jax.Array) -> jax.Array:
        """[B, T] -> [B, T, D], scaled by sqrt(D) rounded to the activation dtype as HF does."""
        x = jnp.take(self.input_embedding, ids, axis=0).astype(self.dtype)
        return x * jnp.asarray(math.sqrt(self.width), self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V]: the table [V, D] is an output-first weight."""
        return _project(x, self.input_embedding.astype(self.dtype), 1, out_first=True)


def _cpu_bfloat16(dtype) -> bool:
    """Whether XLA:CPU's bf16 matmul rules apply (see `_project`): bf16 on the CPU backend. Other
    backends multiply bf16 natively and take the plain forms."""
    return dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def weights_out_first(dtype) -> bool:
    """Whether inference layers in `dtype` run faster on projection weights stored [*out, *in] (see
    `_project`): only bf16 on CPU. In float32 that layout gains nothing worth a transpose at load
    (one PaliGemma 1 layer: 1 row 9.5 ms against 10.5; 8 rows 17.7 against 15.1; 64 rows 56.8 against 44.9)."""
    return _cpu_bfloat16(dtype)


# bf16 rows below which `_project` streams an output-first weight as the left operand (one PaliGemma
# 1 layer: 8 rows 9.7 ms as left operand vs 11.2 as dot_general; 16 rows 14.1 vs 11.6).
_FEW_ROWS = 16


def _project(x: jax.Array, w: jax.Array, in_axes: int, out_first: bool = False) -> jax.Array:
    """x [..., *in] @ w -> [..., *out] as one 2-D matmul; w is [*in, *out], or [*out, *in] if out_first.

    XLA:CPU runs einsums whose weight keeps several free axes (or whose contracted axis sits in the
    middle) through a generic loop that is 10x slower than its GEMM, which dominates decoding.
    XLA:CPU multiplies bf16 only through YNNPACK ([M, K] @ [K, N], both operands row-major, M and
    N >= 2, f32 out); any other bf16 product runs in float32 on a converted copy of its operands,
    and a weight on the right is repacked on every call. So a few bf16 rows (decoding) are
    multiplied as w [*out, *in] @ [rows^T | 0]: the weight is streamed once as it lies, the zero
    column stops XLA from folding the transpose into the dot (which YNNPACK rejects) and makes
    N >= 2 for one row (PaliGemma 1 3B, one layer, one row: 9.0 ms against 15.6 with w on the right).
    A weight stored [*in, *out] takes one bf16 row padded to two.
    """
    n_in = math.prod(w.shape[w.ndim - in_axes :] if out_first else w.shape[:in_axes])
    out_shape = w.shape[: w.ndim - in_axes] if out_first else w.shape[in_axes:]
    lead = x.shape[: x.ndim - in_axes]
    rows = x.reshape(-1, n_in)  # [M, n_in]
    m = rows.shape[0]
    if out_first and _cpu_bfloat16(rows.dtype) and m < _FEW_ROWS:
        cols = jnp.concatenate([rows.T, jnp.zeros((n_in, 1), rows.dtype)], axis=1)
        y = jnp.dot(w.reshape(-1, n_in), cols, preferred_element_type=jnp.float32)[:, :m].T
    elif out_first:
        y = jax.lax.dot_general(rows, w.reshape(-1, n_in), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        single = _cpu_bfloat16(rows.dtype) and m == 1
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)]) if single else rows
        y = jnp.dot(rows, w.reshape(n_in, -1), preferred_element_type=jnp.float32)[:m]
    return y.astype(x.dtype).reshape(*lead, *out_shape)


def _weight(module: nn.Module, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], out_first: bool):
    """Declares a layer projection weight: [*in, *out], or [*out, *in] if out_first."""
    return module.param(name, _init, (*out_shape, *in_shape) if out_first else (*in_shape, *out_shape))


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding in the split-halves layout; x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nn.Module):
    """Multi-query / grouped-query attention with RoPE, soft-capping and an optional cache."""

    cfg: GemmaConfig
    dtype: jnp.dtype = jnp.float32
    out_first: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, layer_kv, write_index):
        """x [B, T, D], positions [B, T], mask [B, T, S] bool; layer_kv: (k, v) [B, S, K, H] or None.

        Returns ([B, T, D], the updated (k, v) or None).
        """
        c = self.cfg
        heads, kv_heads, f = (c.num_heads, c.head_dim), (2, c.num_kv_heads, c.head_dim), self.out_first
        w_q = _weight(self, "q_einsum", (c.width,), heads, f)  # [D, N, H]
        w_kv = _weight(self, "kv_einsum", (c.width,), kv_heads, f)  # [D, 2, K, H]
        w_o = _weight(self, "attn_vec_einsum", heads, (c.width,), f)  # [N, H, D]

        q = _project(x, w_q.astype(self.dtype), 1, f) + lora.delta(self, "q_einsum", x)  # [B, T, N, H]
        kv = jnp.moveaxis(_project(x, w_kv.astype(self.dtype), 1, f), 2, 0)  # [2, B, T, K, H]
        k, v = kv + lora.delta(self, "kv_einsum", x)
        q = apply_rope(q, positions, c.rope_base)
        k = apply_rope(k, positions, c.rope_base)
        if layer_kv is not None:
            k = kv_cache.write(layer_kv[0], k, write_index)
            v = kv_cache.write(layer_kv[1], v, write_index)
            layer_kv = (k, v)

        b, t = q.shape[:2]
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k.astype(self.dtype), preferred_element_type=jnp.float32)
        logits = logits * c.query_scale
        if c.attn_logit_softcap is not None:
            logits = jnp.tanh(logits / c.attn_logit_softcap) * c.attn_logit_softcap
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(self.dtype)).reshape(b, t, c.num_heads, c.head_dim)
        y = _project(out, w_o.astype(self.dtype), 2, f) + lora.delta(self, "attn_vec_einsum", out)
        return y, layer_kv


class FeedForward(nn.Module):
    """GeGLU: `linear(gelu(x @ gate) * (x @ up))`."""

    cfg: GemmaConfig
    dtype: jnp.dtype = jnp.float32
    out_first: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, f = self.cfg, self.out_first
        w_gating = _weight(self, "gating_einsum", (c.width,), (2, c.mlp_dim), f)  # [D, 2, F]
        w_linear = _weight(self, "linear", (c.mlp_dim,), (c.width,), f)  # [F, D]
        gating = jnp.moveaxis(_project(x, w_gating.astype(self.dtype), 1, f), 2, 0)  # [2, B, T, F]
        gate, up = gating + lora.delta(self, "gating_einsum", x)
        hidden = nn.gelu(gate, approximate=self.cfg.gelu_approximate) * up
        return _project(hidden, w_linear.astype(self.dtype), 1, f) + lora.delta(self, "linear", hidden)


class Block(nn.Module):
    """One decoder layer. Gemma 2 adds norms after attention and after the MLP (`post_norms`)."""

    cfg: GemmaConfig
    dtype: jnp.dtype = jnp.float32
    out_first: bool = False

    @nn.compact
    def __call__(self, x, positions, masks, is_sliding, layer_kv, write_index):
        """Scanned over layers: x is the carry; is_sliding [] and layer_kv are this layer's slices."""
        c = self.cfg
        mask = jnp.where(is_sliding, masks[1], masks[0])
        h = RMSNorm(c.rms_norm_eps, name="pre_attention_norm")(x)
        h, layer_kv = Attention(c, self.dtype, self.out_first, name="attn")(h, positions, mask, layer_kv, write_index)
        if c.post_norms:
            h = RMSNorm(c.rms_norm_eps, name="post_attention_norm")(h)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, name="pre_ffw_norm")(x)
        h = FeedForward(c, self.dtype, self.out_first, name="mlp")(h)
        if c.post_norms:
            h = RMSNorm(c.rms_norm_eps, name="post_ffw_norm")(h)
        return x + h, layer_kv


class Gemma(nn.Module):
    """The decoder stack: embedder, L blocks, final norm, tied logits.

    `scan_layers` (the checkpoint layout) runs the blocks under `nn.scan` on stacked weights
    (`layers/...` [L, ...]); False gives each block its own weights (`layers_0/...`, ...; see
    `paligemma.split_layers`). XLA:CPU copies a layer's slice out of a stacked weight before a
    matmul can read it, so decoding on stacked weights moves each layer's bytes three times instead
    of once (PaliGemma 1 widths, 6 layers, float32: 2.4x the memory-bandwidth floor against 1.5x).
    `remat` recomputes each layer's activations in the backward pass (training memory).
    `out_first`: the layers' projection weights are stored [*out, *in] (`PROJECTION_IN_AXES`,
    `paligemma.split_layers`), which bf16 decoding on CPU reads faster (`weights_out_first`).
    """

    cfg: GemmaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = True
    out_first: bool = False

    def setup(self):
        c = self.cfg
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        self.embedder = Embedder(c.vocab_size, c.width, self.dtype)
        if self.scan_layers:
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0, "lora": 0},  # LoRA adapters (lora.py) are stacked like the weights
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                length=c.depth,
            )(c, self.dtype, self.out_first)
        else:
            self.layers = [block(c, self.dtype, self.out_first) for _ in range(c.depth)]  # named layers_0, layers_1, ...
        self.final_norm = RMSNorm(c.rms_norm_eps)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embedder.encode(ids)

    def __call__(self, x, positions, masks, kv, write_index=0):
        """x [B, T, D] embedded inputs; masks: (full, sliding) [B, T, S]; kv: (k, v) [L, B, S, K, H]
        or None. Returns (final-normed hidden states [B, T, D], updated kv or None)."""
        is_sliding = jnp.asarray(self.cfg.layer_is_sliding, bool)  # [L]
        if self.scan_layers:
            x, kv = self.layers(x, positions, masks, is_sliding, kv, write_index)
        else:
            x, kv = self._layer_by_layer(x, positions, masks, is_sliding, kv, write_index)
        return self.final_norm(x), kv

    def _layer_by_layer(self, x, positions, masks, is_sliding, kv, write_index):
        """The unscanned stack; the cache stays stacked [L, ...], as nn.scan returns it."""
        updated = []
        for i, layer in enumerate(self.layers):
            x, layer_kv = layer(x, positions, masks, is_sliding[i], None if kv is None else (kv[0][i], kv[1][i]),
                                write_index)
            updated.append(layer_kv)
        return x, None if kv is None else tuple(jnp.stack(parts) for parts in zip(*updated))

    def logits(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] float32, with Gemma 2's final soft cap where configured."""
        logits = self.embedder.decode(x).astype(jnp.float32)
        if self.cfg.final_logit_softcap is not None:
            cap = self.cfg.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits
