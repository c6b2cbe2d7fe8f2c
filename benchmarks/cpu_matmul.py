"""The projection forms `backend.project` chooses between, on this CPU: one decoder layer's five
projections (q, kv, attention output, gate/up, down) at 1, 8 and 64 rows.

    python -m benchmarks.cpu_matmul [--repeats 5] [--rows 1 8 64] [--width-scale 1.0]

Each form is compiled twice, with XLA's defaults (`xla_cpu_enable_platform_dependent_math` on:
YNNPACK picks its kernels by the CPU, AMX's among them) and with consistent arithmetic (that option
off, and no while-loop invariant code motion, which would hoist `tiled_f32`'s conversion of the
whole weight out of its loop), timed interleaved, and its error against float64 reported;
`backend.Policy.compiler_options` takes the second, except on a CPU with AMX, where only the first
multiplies bf16 on AMX. The table goes into docs/performance.md.

Forms (x [M, K], the weight stored [K, N] as in the checkpoint, or [N, K] output axes first):
  left_zero    bf16, w [N, K] @ [x^T | 0] -> [N, M + 1]: the weight as the LEFT operand, with a zero
               column (what `backend.project` runs on XLA:CPU in bf16 for few rows);
  dot          bf16, x [M, K] @ w [K, N], the weight as the right operand (checkpoint layout);
  dot_pad      `dot` with a zero row added when M = 1 (YNNPACK takes only M >= 2);
  dot_general  bf16, x [M, K] . w [N, K] contracting both last axes (output-first layout, no trick);
  tiled_f32    bf16 w [N, K] converted to float32 a few output channels at a time (about
               `backend.Policy.tile_bytes` each) and multiplied by float32 rows while in cache:
               `backend._tiled`, the form quantised weights take on CPU;
  kernel       bf16, w [N, K] through `cpu_kernels.bf16_matvec` (AVX512-BF16 dot products streaming
               each weight row from memory once: what `backend.project` runs below `_BF16_KERNEL_ROWS` rows where
               the CPU has AVX512-BF16 and the install built the kernels);
  amx          bf16, w [N, K] through `cpu_kernels.bf16_gemm` (AMX tiles: what `backend.project` runs
               from `_AMX_ROWS` rows where this process is granted AMX; listed only there);
  amx_kn       bf16, w [K, N] (checkpoint layout) through `cpu_kernels.bf16_gemm(..., out_first=False)`,
               each block of the weight paired for the tiles per call (what `backend.project` runs from
               `_AMX_KN_ROWS` rows for a weight stored inputs first, SigLIP's; AMX only);
  float32      float32, x [M, K] @ w [K, N] (checkpoint layout);
  onednn       `dot` with XLA:CPU's oneDNN path on (`xla_cpu_use_onednn`) and YNNPACK's dot fusion
               off, so that oneDNN gets the dot: what XLA offers besides YNNPACK (it hands oneDNN
               the bf16 operands converted to float32; ONEDNN_VERBOSE=1 shows the primitive).
Every bf16 form accumulates in float32 (`preferred_element_type`), as the model does.

Prints the CPU model, the instruction-set flags that matter to XLA:CPU's kernels (AVX-512,
VNNI, AMX, BF16), jax's version, then per form and row count the best and the median ms per
layer over the repeats (best first: the machine is shared, and the best run is the least disturbed).
PaliGemma 1 3B widths by default (D 2048, 8 x 256 query heads, 1 kv head, MLP 16384): about
220 MB of bf16 weights per form; `--width-scale 0.5` halves every width on a crowded machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from pali_jax import backend, cpu_kernels

# (name, K = contracted size, N = output size) of one PaliGemma 1 3B decoder layer.
LAYER = (("q", 2048, 2048), ("kv", 2048, 512), ("attn_out", 2048, 2048), ("gate_up", 2048, 32768), ("down", 16384, 2048))


def _left_zero(x, w_out_first):
    m = x.shape[0]
    cols = jnp.concatenate([x.T, jnp.zeros((x.shape[1], 1), x.dtype)], axis=1)
    return jnp.dot(w_out_first, cols, preferred_element_type=jnp.float32)[:, :m].T.astype(x.dtype)


def _dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _dot_pad(x, w):
    m = x.shape[0]
    rows = jnp.concatenate([x, jnp.zeros_like(x)]) if m == 1 else x
    return jnp.dot(rows, w, preferred_element_type=jnp.float32)[:m].astype(x.dtype)


def _dot_general(x, w_out_first):
    return jax.lax.dot_general(x, w_out_first, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


def _tiled_f32(x, w_out_first):
    policy = backend.Policy.host()
    k = x.shape[1]
    return backend._tiled(x.astype(jnp.float32), w_out_first, k, True,
                          policy.tile_rows(k, jnp.float32)).astype(x.dtype)


def _kernel(x, w_out_first):
    return cpu_kernels.bf16_matvec(x, w_out_first).astype(x.dtype)


def _amx(x, w_out_first):
    return cpu_kernels.bf16_gemm(x, w_out_first, x.dtype)


def _amx_kn(x, w):
    return cpu_kernels.bf16_gemm(x, w, x.dtype, False)


ONEDNN = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_ynn_fusion_type": ""}

# form -> (product, weight dtype, weight stored output axes first, XLA options added to both compiles)
FORMS = {
    "left_zero": (_left_zero, jnp.bfloat16, True, {}),
    "dot": (_dot, jnp.bfloat16, False, {}),
    "dot_pad": (_dot_pad, jnp.bfloat16, False, {}),
    "dot_general": (_dot_general, jnp.bfloat16, True, {}),
    "tiled_f32": (_tiled_f32, jnp.bfloat16, True, {}),
    "kernel": (_kernel, jnp.bfloat16, True, {}),
    "amx": (_amx, jnp.bfloat16, True, {}),
    "amx_kn": (_amx_kn, jnp.bfloat16, False, {}),
    "float32": (_dot, jnp.float32, False, {}),
    "onednn": (_dot, jnp.bfloat16, False, ONEDNN),
}


# consistent arithmetic, as backend.Policy compiles every inference program on a CPU without AMX
CONSISTENT = backend.Policy("cpu").compiler_options()


def _layer_program(product, options):
    def run(xs, ws):
        return [product(x, w) for x, w in zip(xs, ws)]

    return jax.jit(run, compiler_options=options)


def _time(run, xs, ws, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(xs, ws))
        times.append(time.perf_counter() - t0)
    return times


def _error(outs, xs, ws, out_first: bool) -> float:
    """Largest relative max-abs error of the layer's products against float64 on the same operands."""
    worst = 0.0
    for out, x, w in zip(outs, xs, ws):
        w64 = np.asarray(w, np.float64)
        exact = np.asarray(x, np.float64) @ (w64.T if out_first else w64)
        worst = max(worst, float(np.abs(np.asarray(out, np.float64) - exact).max() / np.abs(exact).max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--width-scale", type=float, default=1.0)
    p.add_argument("--forms", nargs="+", default=None, choices=list(FORMS), help="default: every form this CPU runs")
    report.add_arguments(p)
    args = p.parse_args()
    args.forms = args.forms or [f for f in FORMS if not f.startswith("amx") or cpu_kernels.amx()]
    if "kernel" in args.forms and not cpu_kernels.load():
        p.error("the kernel form needs pali-jax's CPU kernels, which this install did not build (see setup.py)")
    if {"amx", "amx_kn"} & set(args.forms) and not cpu_kernels.amx():
        p.error("the amx forms need a CPU with AMX that Linux lets this process use, and the kernels built")
    features = backend.cpu_features()
    print(f"cpu: {backend.cpu_model()}")
    print(f"flags: {' '.join(sorted(features)) or '(none of the tracked ones)'}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    shapes = [(n, max(8, int(k * args.width_scale)), max(8, int(o * args.width_scale))) for n, k, o in LAYER]
    print("layer: " + ", ".join(f"{n} {k}x{o}" for n, k, o in shapes))
    rng = np.random.default_rng(0)
    master = [rng.standard_normal((k, o), np.float32) * 0.02 for _, k, o in shapes]
    columns = ["form", "rows", "ms/layer XLA defaults (best / median)", "ms/layer consistent arithmetic (best / median)",
               "rel. error defaults", "rel. error consistent"]
    print(" | ".join(columns))
    rows = []
    for form in args.forms:
        product, dtype, out_first, extra = FORMS[form]
        ws = [jnp.asarray(w.T.copy() if out_first else w, dtype) for w in master]
        default, policy = _layer_program(product, extra or None), _layer_program(product, {**CONSISTENT, **extra})
        for m in args.rows:
            xs = [jnp.asarray(rng.standard_normal((m, k), np.float32), dtype) for _, k, _ in shapes]
            errors = [_error(run(xs, ws), xs, ws, out_first) for run in (default, policy)]  # compiles both
            times = ([], [])
            for _ in range(args.repeats):  # interleaved, so both see the same machine
                for run, into in zip((default, policy), times):
                    into.extend(_time(run, xs, ws, 1))
            cells = [f"{min(t) * 1e3:.1f} / {statistics.median(t) * 1e3:.1f}" for t in times]
            rows.append([form, m, *cells, f"{errors[0]:.1e}", f"{errors[1]:.1e}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        del ws
    report.write(args, "cpu_matmul", columns, rows, note=(
        f"CPU flags: {' '.join(sorted(features)) or 'none tracked'}. One PaliGemma 1 3B decoder layer's five "
        "products per form; 'consistent' is xla_cpu_enable_platform_dependent_math off and no while-loop invariant code "
        "motion, as backend.Policy compiles every CPU inference program except on AMX CPUs, where it keeps XLA's "
        f"platform-dependent math (this CPU: {'AMX' if backend.Policy.host()._has_amx() else 'no AMX'}); errors are the "
        "largest max-abs error over the five products relative to the largest exact value (float64 on the same operands)."))


if __name__ == "__main__":
    main()
