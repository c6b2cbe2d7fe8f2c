"""Every choice that depends on the backend (CPU, GPU, TPU) and the dtype, made here once.

The model files (`siglip.py`, `gemma.py`, `paligemma.py`) are written as the math; what differs
between backends is decided by the functions below and reaches the model as data: a `Layout`
(how decoder weights are stored), `project` (how a stored weight is multiplied), `attention_kernel`
(which attention implementation runs) and `compiler_options` (XLA options of inference programs).

Measurements behind the choices (2-core CPU of this project's machines, XLA:CPU of jax 0.10; the
figures and commands are in README.md and benchmarks/):

* Stacked vs per-layer decoder weights. XLA:CPU copies a layer's slice out of each stacked weight
  before a matmul can read it, so decoding on stacked weights moves every weight byte three times
  per token (PaliGemma 1 widths, 6 layers, float32: 2.4x the memory-bandwidth floor against 1.5x;
  2 + 2 layers, batch 1: float32 119 -> 74 ms/token, bfloat16 90 -> 59). Inference therefore runs
  the layers one by one on their own weights; training keeps them stacked under `nn.scan` (one
  traced layer: short compiles, and the checkpoint's own layout).
* bfloat16 matmuls on XLA:CPU run only through YNNPACK ([M, K] @ [K, N], both row-major, M and
  N >= 2, float32 out); any other bf16 product runs in float32 on converted copies of its
  operands, and a weight given as the right operand is repacked on every call. A weight stored
  output axes first and streamed as the LEFT operand, `w [N, K] @ [x^T | 0]`, avoids both (one
  PaliGemma 1 3B layer, one row: 9.0 ms against 15.6 with the weight on the right). The zero
  column keeps XLA from folding the transpose into the dot (which YNNPACK rejects) and makes
  N >= 2 for a single row. In float32 the output-first layout gains nothing worth a transpose at
  load (1 row 9.5 vs 10.5 ms; 8 rows 17.7 vs 15.1; 64 rows 56.8 vs 44.9), so only bf16 uses it.
* While-loop invariant code motion on XLA:CPU hoists the float32 conversion of every bf16 weight
  out of the decode loop (XLA computes all non-YNNPACK bf16 ops in float32): a bf16 model then
  runs on a float32 copy of its weights (7.3 GB of temporaries for 1.6 GB of bf16 parameters,
  PaliGemma 1 widths, 2 + 2 layers). Inference programs on CPU are compiled without that pass;
  float32 programs compile to the same code either way.
* Attention: the einsum form (`attention.py`) everywhere except GPU in half precision without
  Gemma 2's soft cap (which `jax.nn.dot_product_attention` cannot apply), where that function may
  take cuDNN's fused kernel. Not measured on a GPU: no device was lent to the session that wrote
  this; every program is only checked to lower for `cuda` and `tpu` (tests/test_lowering.py).
* GPU and TPU multiply bf16 natively, so they get no output-first layout; they get per-layer weights
  for inference as CPU does. Neither choice has been timed on that hardware.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the decoder's weights are stored.

    stacked: every layer parameter has a leading [L] axis and the layers run under `nn.scan`;
      False: one subtree per layer (`llm/layers_0/...`).
    out_first: projection weights are stored with their output axes first ([*out, *in]) instead
      of the checkpoint's [*in, *out] (see `project`).
    """

    stacked: bool = True
    out_first: bool = False


CHECKPOINT_LAYOUT = Layout(stacked=True, out_first=False)  # converters, training, export


def _cpu_bfloat16(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


def inference_layout(dtype) -> Layout:
    """The fastest layout to run inference in `dtype` on the current backend (see module docstring)."""
    return Layout(stacked=False, out_first=_cpu_bfloat16(dtype))


def training_layout(dtype) -> Layout:
    """Training keeps the checkpoint layout: one traced layer, and checkpoints that load anywhere."""
    del dtype
    return CHECKPOINT_LAYOUT


# bf16 rows below which an output-first weight is streamed as the left operand (one PaliGemma 1
# layer: 8 rows 9.7 ms as left operand vs 11.2 as dot_general; 16 rows 14.1 vs 11.6).
_FEW_ROWS = 16


def project(x: jax.Array, w: jax.Array, in_axes: int, out_first: bool) -> jax.Array:
    """x [..., *in] times a weight stored [*in, *out] (or [*out, *in] if out_first) -> [..., *out],
    as ONE 2-D matmul accumulated in float32 and rounded to x's dtype.

    XLA:CPU runs einsums whose weight keeps several free axes (or whose contracted axis sits in the
    middle) through a generic loop ten times slower than its GEMM, hence the reshapes.
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
        single = _cpu_bfloat16(rows.dtype) and m == 1  # YNNPACK needs M >= 2
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)]) if single else rows
        y = jnp.dot(rows, w.reshape(n_in, -1), preferred_element_type=jnp.float32)[:m]
    return y.astype(x.dtype).reshape(*lead, *out_shape)


AttentionKernel = Literal["einsum", "dot_product_attention"]


def attention_kernel(dtype, softcap: float | None) -> AttentionKernel:
    """Which attention implementation a model in `dtype` runs (see module docstring)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and softcap is None:
        return "dot_product_attention"
    return "einsum"


def compiler_options() -> dict[str, str] | None:
    """XLA options for every inference program (see module docstring: invariant code motion)."""
    if jax.default_backend() == "cpu":
        return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    return None

