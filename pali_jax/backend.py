"""Every choice that depends on the platform (CPU, GPU, TPU), the CPU and the dtype, made here once.

The model files (`siglip.py`, `gemma.py`, `paligemma.py`) are written as the math; what differs
between platforms is a `Policy`, a frozen value the model and its programs carry as data: it is
built once from the running backend (`Policy.host()`) or named explicitly (`Policy("cuda")`), and
nothing reads `jax.default_backend()` while a program is traced. So a CPU host can trace, lower
and check the very program a GPU or TPU process would run (tests/test_lowering.py).

A policy decides:
* `inference_layout`: how decoder weights are stored for inference (`Layout`). XLA:CPU copies a
  layer's slice out of each stacked weight before a matmul can read it, so decoding on stacked
  weights moves every weight byte several times per token; inference therefore runs the layers one
  by one on their own weights, on every platform. Training keeps them stacked under `nn.scan` (one
  traced layer: short compiles, and the checkpoint's own layout). The figures are in README's
  performance section (no script in benchmarks/ re-measures this one yet).
* `matmul_form`: how a stored weight is multiplied (`project`). bfloat16 matmuls on XLA:CPU run
  only through YNNPACK ([M, K] @ [K, N], both row-major, M and N >= 2, float32 out); any other
  bf16 product runs in float32 on converted copies of its operands, and a weight given as the
  right operand is repacked on every call. On CPU in bf16 the weights are therefore stored output
  axes first. For a few rows (decoding) even YNNPACK's best form streams the weights at a fraction
  of the memory's rate, so where the install built `cpu_kernels` and the CPU has AVX512-BF16,
  fewer than _BF16_KERNEL_ROWS rows (decoding, batched decoding, beams) go through
  `cpu_kernels.bf16_matvec` (`kernel`: each weight row read once per block of four rows, bf16
  products accumulated in float32). Otherwise, for one to three rows, the
  weight is streamed as the LEFT operand, `w [N, K] @ [x^T | 0]` (`left_zero`: the zero column
  keeps XLA from folding the transpose into the dot, which YNNPACK rejects, and makes N >= 2 for a
  single row); for more rows a plain dot_general is faster, except that a batch's prefill (from
  _WIDE_TILED_ROWS rows) times a weight contracting at least `wide_input` inputs (the MLP's down projection)
  run a few output channels at a time (`tiled`, `_tiled` without dequantisation): YNNPACK's
  GEMM is faster on those tiles than on the whole weight on the AMD EPYCs, level on the Intel
  Xeons (benchmarks/cpu_rates.py, `project` against one XLA dot). On a CPU with AMX (where Linux
  grants this process the tiles), from _AMX_ROWS rows a product whose shape fits AMX's tiles goes
  through `cpu_kernels.bf16_gemm` (`amx`: the weight read in place as AMX's left operand, the rows
  packed once per call; benchmarks/cpu_matmul.py, `amx` against `dot_general`). In float32 the output-first layout
  gains nothing worth a transpose at load. GPUs and TPUs multiply bf16 natively: plain dots,
  checkpoint axis order. Benchmark: benchmarks/cpu_matmul.py (prints the CPU and its flags; the
  forms measured are the ones named here).
* `quantized_form`: how a quantised weight (`quantize.py`, {"qvalue", "qscale"}) is multiplied.
  GPUs and TPUs (and the portable policy): `dequantize`, the weight dequantised to the activation
  dtype inside the program and multiplied in its `matmul_form` (XLA fuses the dequantisation into
  the matmul's fusion on GPU and TPU). XLA:CPU fuses nothing into a dot: the dequantised weight is
  written whole and read back on every call, slower than the float weight itself. On CPU, below
  _QUANT_KERNEL_ROWS rows, an int8-held weight (int8, or int4 one value per byte) stored output
  axes first goes through `cpu_kernels.quant_matvec` where it runs (`kernel`: the bytes read once,
  converted to float32 in registers, each group's sum scaled once). On AMX, from _AMX_INT8_ROWS bf16
  rows, an int8 weight with one scale per output channel goes through `cpu_kernels.int8_gemm`
  (`amx`: its values converted to bf16 exactly, a block at a time, the float32 sums scaled once;
  benchmarks/cpu_quant_matmul.py, `amx`). Otherwise the product is
  tiled: a `lax.map` over blocks of output channels, each block dequantised (about `tile_bytes`,
  4 MB: it stays in cache, and its product runs on several threads) and multiplied at once. Below
  _FEW_ROWS rows the tiles are float32 whatever the activations (`tiled_f32`: XLA:CPU's float32
  matrix-vector product is many times its bf16 one); for more rows (prefill, batches) they are in
  the activation dtype and multiplied in its `matmul_form` (`tiled`: YNNPACK's bf16 GEMM). Each
  output is computed within one tile, so it is rounded once, as in one dot. Benchmark:
  benchmarks/cpu_quant_matmul.py (the forms, the kernel, tile sizes, XLA:CPU's YNNPACK elementwise
  fusion, an int8 x int8 dot on dynamically quantised rows, nibble-packed int4; docs/performance.md).
  Nibble-packed int4 (`Layout.int4_packed`, which `inference_layout` picks in bf16 on CPU where
  the bf16 kernel runs) goes through `cpu_kernels.int4_matvec` (`int4_kernel`), and on a CPU with
  AMX from `_AMX_INT4_ROWS` rows through `cpu_kernels.int4_gemm` (each block dequantised to bf16
  as it is used, the tiled form's numerics): packed bytes have no other fast product (XLA:CPU
  unpacks nibbles slowly: `tiled packed`). The same measurement has the matrix-vector kernel far
  ahead for decoding's few rows and behind the tiled product of int4 held one per byte at a
  prefill's hundreds (`--rows 256`), the price of half the bytes. Elsewhere a packed weight is
  dequantised whole.
* `compiler_options`: while-loop invariant code motion on XLA:CPU hoists the float32 conversion
  of every bf16 weight out of the loop that uses it (XLA:CPU computes all non-YNNPACK bf16 ops in
  float32): a bf16 model would then decode on a float32 copy of its weights, and a train step over
  `nn.scan`'s stacked layers would hold a float32 copy of every layer's frozen weights (checked
  on the compiled step's memory by tests/test_train.py). Every CPU program is compiled without
  that pass (float32 programs compile to the same code either way; checked by
  tests/test_generate.py), and with
  `xla_cpu_enable_platform_dependent_math` off, which asks YNNPACK (XLA:CPU's matmul library) for
  consistent arithmetic: results that do not depend on the CPU's instruction set (with it on, an
  AVX512-BF16 CPU accumulates bf16 products its own way, farther from float64). YNNPACK is the
  option's only reader in XLA:CPU. On a CPU with AMX (granted to this process) the option stays on:
  consistent arithmetic forbids YNNPACK its AMX kernels, which multiply bf16 several times faster
  there and accumulate in float32 as exactly (the same errors as `cpu_kernels.bf16_gemm`'s).
  Its cost and its error are measured per form both ways by benchmarks/cpu_matmul.py
  (docs/performance.md).
  Other platforms get no options.
* `attention_kernel`: the einsum form (`attention.py`) everywhere except CUDA in half precision
  without Gemma 2's soft cap (which `jax.nn.dot_product_attention` cannot apply), where cuDNN's
  fused kernel runs (`jax.nn.dot_product_attention(implementation="cudnn")`). Not timed on a GPU
  yet: benchmarks/gpu_check.py is the script for that.

`cpu_features` (from /proc/cpuinfo) are part of the policy so that a choice can follow the CPU
(this project's machines alternate between AMD EPYC and Intel Xeon with AMX and AVX512-VNNI);
benchmarks/cpu_matmul.py prints them beside its figures. `cpu_kernels` says whether the kernels'
library loaded in this process (the host policy asks `cpu_kernels.load()`; a named policy has them
only if told, so a CPU host traces the same program for any policy).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import jax
import jax.extend
import jax.numpy as jnp

from pali_jax import cpu_kernels, quantize

if TYPE_CHECKING:
    from pali_jax.quantize import Quantization

Platform = Literal["cpu", "cuda", "rocm", "tpu"]
PLATFORMS: tuple[Platform, ...] = ("cpu", "cuda", "rocm", "tpu")
AttentionKernel = Literal["einsum", "cudnn"]
MatmulForm = Literal["dot", "dot_pad", "dot_general", "left_zero", "kernel", "tiled", "amx"]
QuantizedForm = Literal["dequantize", "tiled", "tiled_f32", "kernel", "int4_kernel", "amx"]

# /proc/cpuinfo flags of the x86 instruction sets XLA:CPU's kernels (YNNPACK, oneDNN, Eigen)
# dispatch on for float32, bf16 and int8 matmuls.
TRACKED_CPU_FLAGS = frozenset({
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
})
_CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str:
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


@functools.cache
def cpu_features() -> frozenset[str]:
    """The tracked instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is not)."""
    return frozenset(_cpuinfo_field("flags").split()) & TRACKED_CPU_FLAGS


def cpu_model() -> str:
    return _cpuinfo_field("model name") or "unknown"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the decoder's weights are stored.

    stacked: every layer parameter has a leading [L] axis and the layers run under `nn.scan`;
      False: one subtree per layer (`llm/layers_0/...`).
    out_first: projection weights are stored with their output axes first ([*out, *in]) instead
      of the checkpoint's [*in, *out] (see `project`).
    quant: None, or how the projections, the embedding table and SigLIP's projections are
      quantised (`quantize.Quantization`): each such weight is then a {"qvalue", "qscale"} subtree.
    int4_bytes: int4 values are held in int8 arrays, one per byte (the decoder's and the
      embedding's, under int4 quantisation). XLA:CPU keeps a jnp.int4 array one value per byte
      anyway, and converts int4 to float several times slower than int8 (the `tiled` product's
      bottleneck: benchmarks/cpu_quant_matmul.py), so this costs no memory there. Checkpoints
      (`CHECKPOINT_LAYOUT`) hold jnp.int4.
    int4_packed: the language model's int4 values nibble-packed, two per byte (`quantize.pack_int4`),
      wherever a weight's groups allow it (`quantize.packable`; the others as `int4_bytes` says):
      what `cpu_kernels.int4_matvec` multiplies, reading half the bytes of int8.
    """

    stacked: bool = True
    out_first: bool = False
    quant: Quantization | None = None
    int4_bytes: bool = False
    int4_packed: bool = False


CHECKPOINT_LAYOUT = Layout(stacked=True, out_first=False)  # converters, training, export

# bf16 rows below which an output-first weight is streamed as the left operand (XLA:CPU; from
# there on dot_general wins: benchmarks/cpu_matmul.py, `left_zero` against `dot_general`).
_LEFT_ZERO_ROWS = 4
# Rows below which a quantised weight's product is tiled in float32 rather than in the activation
# dtype (benchmarks/cpu_quant_matmul.py, `tiled f32` against `tiled bf16`).
_FEW_ROWS = 16
# A quantised weight's product on XLA:CPU is dequantised a tile of about this many bytes at a time
# (benchmarks/cpu_quant_matmul.py, `tiled` against `tiled NK`: 4 and 8 MB decode one row twice as
# fast as 2 MB on this project's 2-core machines, their products running on both threads; 16 MB
# spills the cache).
_TILE_BYTES = 4 << 20
# A prefill's bf16 product with a weight stored output axes first and contracting at least
# _WIDE_INPUT inputs runs tile by tile like a quantised one from _WIDE_TILED_ROWS rows: on the AMD
# EPYCs YNNPACK multiplies many rows by PaliGemma 1's down projection (16384 inputs) faster in
# tile_bytes tiles of output channels than in one product, and its gate/up (2048 inputs) slower; on
# the Intel Xeons the two are level (benchmarks/cpu_rates.py, `project` against `XLA`). Each tiled
# product also lengthens the program's compile (a loop where a dot was), which a batch's prefill
# repays and one prompt's does not (docs/performance.md), so a single prompt keeps the one product.
_WIDE_INPUT = 8192
_WIDE_TILED_ROWS = 1024
# Rows below which `cpu_kernels` multiply, and the instruction sets each kernel needs. The bf16
# kernel runs up to 128 rows (benchmarks/cpu_matmul.py, `kernel` against `dot_general`: ahead from
# 1 to 128 rows, level at 256), the quantised one up to 16 (cpu_quant_matmul.py,
# `kernel` against `tiled`: ahead at 16 rows, level at 24).
_BF16_KERNEL_ROWS = 129
_QUANT_KERNEL_ROWS = 17
_BF16_KERNEL_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
_QUANT_KERNEL_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl"})
# Rows from which a bf16 or int8 (per-channel) product runs on AMX tiles (`cpu_kernels.bf16_gemm`,
# `int8_gemm`), where the CPU has AMX-BF16 and Linux grants this process its tiles: level with the
# matrix-vector kernels for one bf16 row and ahead from two (their dot products run out of
# registers as rows grow, AMX's 16-row tiles do not), for int8 from 8 rows (below, converting each
# weight to bf16 costs more than the kernel's reading it); far ahead of YNNPACK's GEMM with
# consistent arithmetic (benchmarks/cpu_matmul.py, `amx` against `kernel` and `dot_general`;
# benchmarks/cpu_quant_matmul.py, `amx` against `kernel`). A weight stored inputs first (SigLIP's,
# the decoder's in the checkpoint layout) is paired for the tiles block by block as it is used:
# slower than output-first, still ahead of YNNPACK's own AMX product from two rows
# (benchmarks/cpu_matmul.py, `amx_kn` against `dot`). The tiles take N a multiple of 16 output
# channels and an even K.
_AMX_ROWS = 2
_AMX_INT8_ROWS = 8
# Rows from which nibble-packed int4 runs on AMX (`cpu_kernels.int4_gemm`: each block dequantised to
# bf16 as it is used) rather than through `int4_matvec`, which reads half int8's bytes but whose dot
# products run out of registers as rows grow (benchmarks/cpu_quant_matmul.py, `packed amx` against
# `packed kernel`).
_AMX_INT4_ROWS = 12
_AMX_FLAGS = _BF16_KERNEL_FLAGS | {"amx_tile", "amx_bf16"}
AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_bf16", "amx_int8"})


@dataclasses.dataclass(frozen=True)
class Policy:
    """The platform a program is traced for, and the CPU's features: every backend-dependent choice
    reads this value, never the process's backend (see the module docstring).

    platform None: no platform's special forms (plain dots, einsum attention, no compiler
    options): a portable program, and what shape-only traces (`jax.eval_shape` of an init) use.
    The activation dtype is not part of the policy: the model carries it, and each choice takes it.
    """

    platform: Platform | None = None
    cpu_features: frozenset[str] = frozenset()
    tile_bytes: int = _TILE_BYTES  # the bytes of one tile of a tiled product (its dtype's)
    wide_input: int | None = _WIDE_INPUT  # contracted sizes from which a batch's bf16 prefill is tiled; None: never
    cpu_kernels: bool = False  # `cpu_kernels` loaded in this process (the host policy sets it)

    def __post_init__(self):
        if self.platform is not None and self.platform not in PLATFORMS:
            raise ValueError(f"unknown platform {self.platform!r}; use one of {', '.join(PLATFORMS)}")
        object.__setattr__(self, "cpu_features", frozenset(self.cpu_features) & TRACKED_CPU_FLAGS)

    @staticmethod
    @functools.cache
    def host() -> "Policy":
        """The policy of this process's default backend, built once (the only place that reads it)."""
        platform = jax.default_backend()
        if platform == "gpu":
            version = jax.extend.backend.get_backend().platform_version.lower()
            platform = "rocm" if "rocm" in version or "hip" in version else "cuda"
        if platform not in PLATFORMS:
            raise ValueError(f"no policy for backend {platform!r}")
        if platform != "cpu":
            return Policy(platform)
        features = cpu_features() if cpu_kernels.amx() else cpu_features() - AMX_CPU_FLAGS
        return Policy(platform, features, cpu_kernels=cpu_kernels.load())

    def _cpu_bfloat16(self, dtype) -> bool:
        return self.platform == "cpu" and jnp.dtype(dtype) == jnp.bfloat16

    def inference_layout(self, dtype) -> Layout:
        """The fastest layout to run inference in `dtype` (see module docstring)."""
        return Layout(stacked=False, out_first=self._cpu_bfloat16(dtype), int4_bytes=self.platform == "cpu",
                      int4_packed=self._packs_int4(dtype))

    def _packs_int4(self, dtype) -> bool:
        """Whether int4 weights multiplied in `dtype` are held nibble-packed: only where
        `cpu_kernels.int4_matvec` multiplies them (bf16 rows, its instruction sets)."""
        return self._cpu_bfloat16(dtype) and self._has_kernel(_BF16_KERNEL_FLAGS)

    def _has_kernel(self, flags: frozenset[str]) -> bool:
        """Whether a `cpu_kernels` kernel needing the instruction sets `flags` runs here."""
        return self.cpu_kernels and flags <= self.cpu_features

    def _kernel(self, rows: int, below: int, flags: frozenset[str]) -> bool:
        """Whether a `cpu_kernels` kernel needing the instruction sets `flags` multiplies `rows` rows
        (of a weight stored output axes first, the only layout the kernels take)."""
        return rows < below and self._has_kernel(flags)

    def _amx(self, rows: int, n_in: int, n_out: int, from_rows: int) -> bool:
        """Whether AMX multiplies `rows` bf16 rows by a weight contracting n_in inputs into n_out
        outputs (from `from_rows` rows)."""
        return rows >= from_rows and n_out % 16 == 0 and n_in % 2 == 0 and self._has_kernel(_AMX_FLAGS)

    def matmul_form(self, dtype, rows: int, out_first: bool, n_in: int = 0, n_out: int = 1) -> MatmulForm:
        """How `project` multiplies `rows` rows in `dtype` by a weight stored in- or output axes first,
        contracting `n_in` inputs into `n_out` outputs."""
        if not self._cpu_bfloat16(dtype):
            return "dot_general" if out_first else "dot"
        if self._amx(rows, n_in, n_out, _AMX_ROWS):
            return "amx"
        if not out_first:
            return "dot_pad" if rows == 1 else "dot"
        if self._kernel(rows, _BF16_KERNEL_ROWS, _BF16_KERNEL_FLAGS):
            return "kernel"
        if rows < _LEFT_ZERO_ROWS:
            return "left_zero"
        return "tiled" if rows >= _WIDE_TILED_ROWS and self._wide(n_in) else "dot_general"

    def quantized_form(self, dtype, rows: int, out_first: bool, value_dtype, n_in: int = 0, n_out: int = 1,
                       groups: int = 1) -> QuantizedForm:
        """How `project` multiplies `rows` rows in `dtype` by a quantised weight whose values are
        `value_dtype`, contracting `n_in` inputs into `n_out` outputs with `groups` scales per output
        (module docstring)."""
        if quantize.is_packed(value_dtype):  # nibble-packed int4: the kernels' forms, at any row count
            if not (out_first and self._packs_int4(dtype)):
                return "dequantize"
            return "amx" if self._amx(rows, n_in, n_out, _AMX_INT4_ROWS) else "int4_kernel"
        if self.platform != "cpu":
            return "dequantize"
        if (self._cpu_bfloat16(dtype) and jnp.dtype(value_dtype) == jnp.int8 and groups == 1
                and self._amx(rows, n_in, n_out, _AMX_INT8_ROWS)):
            return "amx"
        if out_first and jnp.dtype(value_dtype) == jnp.int8 and self._kernel(rows, _QUANT_KERNEL_ROWS, _QUANT_KERNEL_FLAGS):
            return "kernel"
        return "tiled_f32" if rows < _FEW_ROWS or jnp.dtype(dtype) == jnp.float32 else "tiled"

    def _wide(self, n_in: int) -> bool:
        return self.wide_input is not None and n_in >= self.wide_input

    def tile_rows(self, n_in: int, dtype) -> int:
        """Output channels per tile of the tiled forms for a weight contracting `n_in` inputs,
        dequantised (or converted) to `dtype`."""
        return max(1, self.tile_bytes // (jnp.dtype(dtype).itemsize * n_in))

    def attention_kernel(self, dtype, softcap: float | None) -> AttentionKernel:
        """Which attention implementation a model in `dtype` runs (see module docstring)."""
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if self.platform == "cuda" and half and softcap is None else "einsum"

    def compiler_options(self) -> dict[str, str | bool] | None:
        """XLA options for every program that runs the model: generation, beam search, forward
        passes and training (see module docstring)."""
        if self.platform != "cpu":
            return None
        return {"xla_cpu_enable_platform_dependent_math": self._has_amx(),
                "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}

    def _has_amx(self) -> bool:
        """Whether this CPU multiplies bf16 on AMX tiles in this process (Policy.host keeps AMX's flags
        only where Linux granted the tiles)."""
        return {"amx_tile", "amx_bf16"} <= self.cpu_features


def training_layout(dtype) -> Layout:
    """Training keeps the checkpoint layout: one traced layer, and checkpoints that load anywhere."""
    del dtype
    return CHECKPOINT_LAYOUT


def project(x: jax.Array, w, in_axes: int, out_first: bool, policy: Policy) -> jax.Array:
    """x [..., *in] times a weight stored [*in, *out] (or [*out, *in] if out_first) -> [..., *out],
    as ONE 2-D matmul accumulated in float32 and rounded to x's dtype, in the form `policy` picks.
    `w` is an array or a quantised weight ({"qvalue", "qscale"}, `quantize.py`, in the same stored
    layout), multiplied as `policy.quantized_form` says.

    XLA:CPU runs einsums whose weight keeps several free axes (or whose contracted axis sits in the
    middle) through a generic loop far slower than its GEMM, hence the reshapes.
    """
    quantized = quantize.is_quantized(w)
    shape = quantize.value_shape(w) if quantized else w.shape
    n_in = math.prod(shape[len(shape) - in_axes :] if out_first else shape[:in_axes])
    out_shape = shape[: len(shape) - in_axes] if out_first else shape[in_axes:]
    lead = x.shape[: x.ndim - in_axes]
    rows = x.reshape(-1, n_in)  # [M, n_in]
    m = rows.shape[0]
    n_out = math.prod(out_shape)
    form = None
    if quantized:
        groups = w[quantize.SCALE].size // n_out
        form = policy.quantized_form(rows.dtype, m, out_first, w[quantize.QVALUE].dtype, n_in, n_out, groups)
    if form == "amx":
        q, scale = w[quantize.QVALUE], w[quantize.SCALE].astype(jnp.float32)
        if quantize.is_packed(q.dtype):  # [N, K / 2] and [N, G]
            y = cpu_kernels.int4_gemm(rows, q.reshape(n_out, -1), scale.reshape(n_out, -1), x.dtype)
        elif out_first:  # one scale per output channel: [N, K] and [N, 1]
            y = cpu_kernels.int8_gemm(rows, q.reshape(n_out, n_in), scale.reshape(n_out, 1), x.dtype)
        else:  # [K, N] and [1, N]
            y = cpu_kernels.int8_gemm(rows, q.reshape(n_in, n_out), scale.reshape(1, n_out), x.dtype, False)
        return y.reshape(*lead, *out_shape)
    if form in ("kernel", "int4_kernel"):  # output axes lead: [N, K] (packed: [N, K / 2]) and [N, G]
        q, scale = w[quantize.QVALUE].reshape(n_out, -1), w[quantize.SCALE].reshape(n_out, -1).astype(jnp.float32)
        if form == "int4_kernel":
            y = cpu_kernels.int4_matvec(rows, q, scale)
        else:
            y = cpu_kernels.quant_matvec(rows.astype(jnp.float32), q, scale)
        return y.astype(x.dtype).reshape(*lead, *out_shape)
    if form in ("tiled", "tiled_f32"):
        dtype = jnp.float32 if form == "tiled_f32" else rows.dtype
        y = _tiled(rows.astype(dtype), w, n_in, out_first, policy.tile_rows(n_in, dtype))
        return y.astype(x.dtype).reshape(*lead, *out_shape)
    if quantized:
        w = quantize.dequantize(w, x.dtype)
    form = policy.matmul_form(rows.dtype, m, out_first, n_in, n_out)
    if form == "amx":
        y = cpu_kernels.bf16_gemm(rows, w.reshape(-1, n_in) if out_first else w.reshape(n_in, -1), x.dtype, out_first)
    elif form == "tiled":
        y = _tiled(rows, w, n_in, out_first, policy.tile_rows(n_in, rows.dtype))
    elif form == "kernel":
        y = cpu_kernels.bf16_matvec(rows, w.reshape(-1, n_in))
    elif form == "left_zero":
        cols = jnp.concatenate([rows.T, jnp.zeros((n_in, 1), rows.dtype)], axis=1)  # [n_in, M + 1]
        y = jnp.dot(w.reshape(-1, n_in), cols, preferred_element_type=jnp.float32)[:, :m].T
    elif form == "dot_general":
        y = jax.lax.dot_general(rows, w.reshape(-1, n_in), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)]) if form == "dot_pad" else rows
        y = jnp.dot(rows, w.reshape(n_in, -1), preferred_element_type=jnp.float32)[:m]
    return y.astype(x.dtype).reshape(*lead, *out_shape)


def _tiled(rows: jax.Array, node, n_in: int, out_first: bool, tile: int) -> jax.Array:
    """rows [M, K] times a quantised or float weight -> [M, N] in rows' dtype, `tile` output
    channels at a time inside a loop (`lax.map`), each tile dequantised (as `quantize.dequantize`
    does, to rows' dtype; a float weight converted to it) and multiplied at once while it is in
    cache: XLA:CPU does not fuse a dequantisation into a dot, and dequantising the whole weight
    writes and reads a float copy of it on every call. Each output is computed within one tile's
    product, so it is rounded once, as in one dot. The last N % tile channels are one smaller product."""
    quantized = quantize.is_quantized(node)
    q = node[quantize.QVALUE] if quantized else node
    k = n_in
    n = q.size // k
    q2 = q.reshape(n, k) if out_first else q.reshape(k, n)  # [N, K] | [K, N]
    axis = 0 if out_first else 1
    if quantized:
        scale = node[quantize.SCALE]
        s2 = scale.reshape(n, -1) if out_first else scale.reshape(-1, n)  # [N, G] | [G, N]: groups along K
        g = s2.shape[1] if out_first else s2.shape[0]

    def product(start, size):  # -> [M, size]
        wt = jax.lax.dynamic_slice_in_dim(q2, start, size, axis)
        if quantized:
            st = jax.lax.dynamic_slice_in_dim(s2, start, size, axis).astype(jnp.float32)
            wt = wt.astype(jnp.float32)
            if out_first:
                wt = (wt.reshape(size, g, k // g) * st[:, :, None]).reshape(size, k)
            else:
                wt = (wt.reshape(g, k // g, size) * st[:, None, :]).reshape(k, size)
        wt = wt.astype(rows.dtype)
        if rows.dtype == jnp.float32:  # XLA:CPU's float32 matrix-vector product takes the weight on the left
            return jnp.dot(wt, rows.T).T if out_first else jnp.dot(rows, wt)
        # a prefill's rows: the plain product `matmul_form` picks for a narrow weight, [M, K] x [K, size]
        y = jax.lax.dot_general(rows, wt, (((1,), (1 if out_first else 0,)), ((), ())), preferred_element_type=jnp.float32)
        return y.astype(rows.dtype)

    tile = min(tile, n)
    full = n // tile * tile
    y = jax.lax.map(lambda i: product(i * tile, tile), jnp.arange(n // tile))  # [N // tile, M, tile]
    y = jnp.moveaxis(y, 1, 0).reshape(rows.shape[0], full)
    if full < n:
        y = jnp.concatenate([y, product(full, n - full)], axis=1)
    return y
