"""The decoding kernels of `cpu_kernels.cc`, called from XLA programs as FFI custom calls.

    bf16_matvec(x bf16 [M, K], w bf16 [N, K])                    -> float32 [M, N]
    quant_matvec(x f32 [M, K], w int8 [N, K], scale f32 [N, G])  -> float32 [M, N]
    int4_matvec(x bf16 [M, K], w uint8 [N, K / 2], scale f32 [N, G]) -> float32 [M, N]
    bf16_gemm(x bf16 [M, K], w bf16 [N, K] | [K, N])             -> float32 | bf16 [M, N]  (AMX)
    int8_gemm(x bf16 [M, K], w int8 [N, K] | [K, N], scale f32 [N, 1] | [1, N])
                                                                 -> float32 | bf16 [M, N]  (AMX)
    int4_gemm(x bf16 [M, K], w uint8 [N, K / 2], scale f32 [N, G]) -> float32 | bf16 [M, N]  (AMX)

They exist because XLA:CPU multiplies a few rows by a bf16 weight at a fraction of the rate the
weight streams from memory, and cannot multiply an int8 weight without writing it out in float
first: decoding, which reads every weight once per token, is bound by those products
(benchmarks/cpu_matmul.py and benchmarks/cpu_quant_matmul.py measure each form against the
kernels). `backend.Policy` decides where they run (few rows, an x86-64 CPU with the instruction
set each needs, the library built); `backend.project` is their only caller.

The library is compiled when the package is installed (setup.py, an optional extension: where no
compiler or no x86-64 CPU is found the install goes on without it, and every product takes XLA's
forms). Setting PALI_JAX_CPU_KERNELS=0 turns the kernels off in a process, to compare.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from pali_jax import quantize

log = logging.getLogger(__name__)

_LIBRARY_STEM = "_cpu_kernels"
_TARGETS = {"pj_bf16_matvec": "PjBf16Matvec", "pj_quant_matvec": "PjQuantMatvec", "pj_int4_matvec": "PjInt4Matvec",
            "pj_bf16_gemm": "PjBf16Gemm", "pj_int8_gemm": "PjInt8Gemm", "pj_bf16_gemm_kn": "PjBf16GemmKn",
            "pj_int8_gemm_kn": "PjInt8GemmKn", "pj_int4_gemm": "PjInt4Gemm"}
DISABLE_ENV = "PALI_JAX_CPU_KERNELS"


def library_path() -> Path | None:
    """The compiled library beside this file, if the install built it."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{_LIBRARY_STEM}{suffix}"
        if path.exists():
            return path
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels' library, registered with XLA's CPU platform once; None where they cannot run
    here (no library, or PALI_JAX_CPU_KERNELS=0)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    path = library_path()
    if path is None:
        log.info("pali-jax's CPU kernels were not built with this install; XLA's products run instead")
        return None
    try:
        library = ctypes.CDLL(str(path))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:
        log.warning("pali-jax's CPU kernels (%s) could not be loaded: %s; XLA's products run instead", path, e)
        return None
    return library


def load() -> bool:
    """Whether the kernels are registered in this process (registering them the first time); where
    not, the policy never picks them."""
    return _library() is not None


@functools.cache
def amx() -> bool:
    """Whether this process may use AMX's tiles (the GEMM kernels): the library loaded, and Linux
    granted the tile state, which it does only on a CPU with AMX and only when asked, once."""
    library = _library()
    return library is not None and library.PjRequestAmx() == 1


def _call(target: str, m: int, n: int, *operands: jax.Array, dtype=jnp.float32) -> jax.Array:
    if not load():
        raise RuntimeError(f"{target}: pali-jax's CPU kernels are not available in this process")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), dtype), vmap_method="sequential")(*operands)


def _keeping_operands(kernel):
    """A custom VJP's forward: the kernel's result, its operands kept for the backward pass."""
    return lambda *operands: (kernel(*operands), operands)


@jax.custom_vjp
def bf16_matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x bf16 [M, K] times w bf16 [N, K] (output channels first) -> float32 [M, N]: the products
    exact in float32, accumulated in float32."""
    return _call("pj_bf16_matvec", x.shape[0], w.shape[0], x, w)


def _bf16_bwd(residuals, g, out_first: bool = True):  # g [M, N]: plain products, never the kernels
    x, w = residuals
    w32 = w.astype(jnp.float32)
    gx = jnp.dot(g, w32 if out_first else w32.T).astype(x.dtype)
    gw = (jnp.dot(g.T, x.astype(jnp.float32)) if out_first else jnp.dot(x.astype(jnp.float32).T, g)).astype(w.dtype)
    return gx, gw


bf16_matvec.defvjp(_keeping_operands(bf16_matvec), _bf16_bwd)


@jax.custom_vjp
def quant_matvec(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x float32 [M, K] times the weight w * scale -> float32 [M, N]; w int8 [N, K] (int8 values,
    or int4 values one per byte), scale float32 [N, G] for G groups of K / G contracted inputs."""
    return _call("pj_quant_matvec", x.shape[0], w.shape[0], x, w, scale)


def _quantized_bwd(residuals, g, out_first: bool = True):  # the frozen integer weight and its scales get no gradient
    x, w, scale = residuals
    weight = quantize.dequantize({quantize.QVALUE: w, quantize.SCALE: scale}, jnp.float32)  # [N, K] | [K, N]
    return jnp.dot(g, weight if out_first else weight.T).astype(x.dtype), None, None


quant_matvec.defvjp(_keeping_operands(quant_matvec), _quantized_bwd)


@jax.custom_vjp
def int4_matvec(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x bf16 [M, K] times the weight w * scale -> float32 [M, N]; w uint8 [N, K / 2], int4 values
    nibble-packed (`quantize.pack_int4`), scale float32 [N, G] for G groups of K / G contracted
    inputs, a multiple of `quantize.PACK_CHUNK`. The products are exact in float32 (bf16 times
    int4), accumulated in float32, each group's sum scaled once."""
    return _call("pj_int4_matvec", x.shape[0], w.shape[0], x, w, scale)


int4_matvec.defvjp(_keeping_operands(int4_matvec), _quantized_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def bf16_gemm(x: jax.Array, w: jax.Array, dtype=jnp.float32, out_first: bool = True) -> jax.Array:
    """`bf16_matvec`'s product on AMX tiles, for more than one row (where `amx()`): x bf16 [M, K]
    times w bf16 [N, K] (out_first) or [K, N] (the checkpoint's layout), N a multiple of 16, K even
    -> [M, N] in `dtype` (float32, or bf16: the float32 sums rounded once, to nearest even, as XLA
    converts); products exact in float32, accumulated in float32."""
    n = w.shape[0] if out_first else w.shape[1]
    return _call("pj_bf16_gemm" if out_first else "pj_bf16_gemm_kn", x.shape[0], n, x, w, dtype=dtype)


def _gemm_fwd(kernel, static: int):
    """A GEMM's custom-VJP forward: its result, its operands (all but its `static` last arguments) kept."""
    return lambda *args: (kernel(*args), args[:-static])


def _gemm_bwd(bwd):
    """A GEMM's custom-VJP backward from a matrix-vector product's: the static arguments (dtype, then
    out_first where the GEMM has it) first, the output's gradient in float32."""
    def backward(dtype, *layout_residuals_g):
        *layout, residuals, g = layout_residuals_g
        return bwd(residuals, g.astype(jnp.float32), *layout)

    return backward


bf16_gemm.defvjp(_gemm_fwd(bf16_gemm, 2), _gemm_bwd(_bf16_bwd))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def int8_gemm(x: jax.Array, w: jax.Array, scale: jax.Array, dtype=jnp.float32, out_first: bool = True) -> jax.Array:
    """x bf16 [M, K] times the weight w * scale on AMX tiles (where `amx()`) -> [M, N] in `dtype`
    (float32, or bf16 rounded once); w int8 [N, K] with scale float32 [N, 1] (out_first), or w
    [K, N] with scale [1, N]; N a multiple of 16, K even: the int8 values converted to bf16
    exactly, the products accumulated in float32 and scaled once per output channel."""
    n = w.shape[0] if out_first else w.shape[1]
    return _call("pj_int8_gemm" if out_first else "pj_int8_gemm_kn", x.shape[0], n, x, w, scale, dtype=dtype)


int8_gemm.defvjp(_gemm_fwd(int8_gemm, 2), _gemm_bwd(_quantized_bwd))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def int4_gemm(x: jax.Array, w: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """x bf16 [M, K] times a nibble-packed int4 weight on AMX tiles (where `amx()`) -> [M, N] in
    `dtype`; w uint8 [N, K / 2] (`quantize.pack_int4`, N a multiple of 16), scale float32 [N, G]
    for G groups of K / G inputs, a multiple of `quantize.PACK_CHUNK`. Each block of the weight is
    dequantised to bf16 as it is used (each value times its group's scale, rounded once: the
    numerics of XLA's tiled form and of the GPU's dequantisation), then multiplied by the rows
    exactly with float32 sums; `int4_matvec` instead scales exact group sums."""
    return _call("pj_int4_gemm", x.shape[0], w.shape[0], x, w, scale, dtype=dtype)


int4_gemm.defvjp(_gemm_fwd(int4_gemm, 1), _gemm_bwd(_quantized_bwd))
