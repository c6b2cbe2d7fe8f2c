"""The SigLIP vision tower in Flax linen, with PaliGemma's linear projector as its `head`.

Numerics follow transformers' SiglipVisionModel: conv patch embedding, learned position
embedding (no interpolation), pre-LN blocks with biased projections and tanh-GELU, final LayerNorm.
Parameter names follow big_vision's ViT (`embedding`, `pos_embedding`, `Transformer/encoderblock`,
`Transformer/encoder_norm`, `head`), whose `head` is exactly PaliGemma's projector.
Attention kernels are einsum-shaped: query/key/value [D, N, H], out [N, H, D].
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pali_jax import backend
from pali_jax.backend import Policy
from pali_jax.config import SiglipConfig
from pali_jax.intermediates import INTERMEDIATES
from pali_jax.layers import declare_weight, product
from pali_jax.quantize import Quantization


def _axes(init, *names):
    return nn.with_logical_partitioning(init, names)


_KERNEL, _BIAS = nn.initializers.lecun_normal(), nn.initializers.zeros_init()


class Dense(nn.Module):
    """A biased projection over x's last `n_in` axes (nn.DenseGeneral's parameters and numerics:
    kernel [*in, *out], bias [*out], products accumulated in float32 and rounded to `dtype`, as
    transformers' bf16 matmuls do), whose kernel `layers.declare_weight` declares, so that it can
    be quantised, and `backend.project` multiplies in the form `policy` picks."""

    features: int | tuple[int, ...]
    axes: tuple[str, ...]  # the kernel's logical axes, inputs then outputs
    n_in: int = 1
    dtype: jnp.dtype = jnp.float32
    quant: Quantization | None = None
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.n_in :]
        shape = (*in_shape, *features)

        def init(key, shape):  # DenseGeneral's: lecun_normal over the flattened [in, out] matrix
            flat = (math.prod(shape[: self.n_in]), math.prod(shape[self.n_in :]))
            return _KERNEL(key, flat).reshape(shape)

        kernel = declare_weight(self, "kernel", init, shape, self.axes, tuple(range(self.n_in)), self.quant)
        bias = self.param("bias", _axes(_BIAS, *self.axes[self.n_in :]), features)
        y = product(self._multiply, x.astype(self.dtype), kernel, self.dtype)
        return y + bias.astype(self.dtype)

    def _multiply(self, x: jax.Array, kernel) -> jax.Array:
        return backend.project(x, kernel, self.n_in, False, self.policy)


def _dense(features, axes: tuple[str, ...], dtype, policy: Policy, name: str | None = None, n_in: int = 1,
           quant=None) -> Dense:
    """A biased projection whose kernel has logical `axes` (inputs then outputs)."""
    return Dense(features, axes, n_in, dtype, quant, policy, name=name)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    ones = nn.initializers.ones_init()
    return nn.LayerNorm(eps, dtype=dtype, name=name, scale_init=_axes(ones, "vision_embed"),
                        bias_init=_axes(_BIAS, "vision_embed"))


class Attention(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    quant: Quantization | None = None
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        heads = (c.num_heads, c.head_dim)
        axes = ("vision_embed", "vision_heads", "vision_head_dim")
        q, k, v = (_dense(heads, axes, self.dtype, self.policy, name, quant=self.quant)(x)
                   for name in ("query", "key", "value"))  # [B, T, N, H]
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * c.head_dim**-0.5
        probs = jax.nn.softmax(logits, axis=-1)
        self.sow(INTERMEDIATES, "attention", probs)
        out = jnp.einsum("bnts,bsnh->btnh", probs.astype(self.dtype), v)
        axes = ("vision_heads", "vision_head_dim", "vision_embed")
        return _dense(c.width, axes, self.dtype, self.policy, "out", n_in=2, quant=self.quant)(out)


class EncoderBlock(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    quant: Quantization | None = None
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
        c = self.cfg
        h = _layer_norm(c.layer_norm_eps, self.dtype, "LayerNorm_0")(x)
        x = x + Attention(c, self.dtype, self.quant, self.policy, name="MultiHeadDotProductAttention_0")(h)
        h = _layer_norm(c.layer_norm_eps, self.dtype, "LayerNorm_1")(x)
        h = _dense(c.mlp_dim, ("vision_embed", "vision_mlp"), self.dtype, self.policy, "Dense_0", quant=self.quant)(h)
        h = nn.gelu(h, approximate=c.gelu_approximate)
        x = x + _dense(c.width, ("vision_mlp", "vision_embed"), self.dtype, self.policy, "Dense_1", quant=self.quant)(h)
        self.sow(INTERMEDIATES, "output", x)
        return x, None


class Encoder(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    quant: Quantization | None = None
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = nn.remat(EncoderBlock, prevent_cse=False) if self.remat else EncoderBlock
        x, _ = nn.scan(
            block, variable_axes={"params": 0, INTERMEDIATES: 0}, split_rngs={"params": True}, length=self.cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.cfg, self.dtype, self.quant, self.policy, name="encoderblock")(x, None)
        return _layer_norm(self.cfg.layer_norm_eps, self.dtype, "encoder_norm")(x)


class SigLIP(nn.Module):
    """pixels [B, H, W, 3] in [-1, 1] -> patch features [B, P, width], projected by `head`."""

    cfg: SiglipConfig
    out_width: int
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    quant: Quantization | None = None  # of the projections and the projector (int8: `Quantization.vision`)
    policy: Policy = Policy()  # the platform the projections are multiplied for (`backend.Policy`)

    def setup(self):
        c = self.cfg
        self.embedding = nn.Conv(
            c.width, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID", dtype=self.dtype,
            kernel_init=_axes(_KERNEL, None, None, None, "vision_embed"), bias_init=_axes(_BIAS, "vision_embed"),
        )
        pos_init = _axes(nn.initializers.normal(0.02), None, "patches", "vision_embed")
        self.pos_embedding = self.param("pos_embedding", pos_init, (1, c.num_patches, c.width))
        self.Transformer = Encoder(c, self.dtype, self.remat, self.quant, self.policy)
        self.head = _dense(self.out_width, ("vision_embed", "embed"), self.dtype, self.policy, quant=self.quant)

    def encode(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> [B, P, width]: the vision tower's last hidden state (after its final norm)."""
        x = self.embedding(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x + self.pos_embedding.astype(self.dtype)
        self.sow(INTERMEDIATES, "embeddings", x)
        return self.Transformer(x)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> [B, P, out_width]: image tokens in the language model's width."""
        return self.head(self.encode(pixels))
