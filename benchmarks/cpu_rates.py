"""What this CPU delivers to a decode step and to a prefill: the rate at which each of pali-jax's
CPU kernels streams 1 GiB of weights against the read-bandwidth probe the floors use, and the
rate of a prefill's bf16 matrix products in XLA (YNNPACK, and XLA's oneDNN path) against PyTorch
(oneDNN's bf16 kernels, what transformers runs).

    python -m benchmarks.cpu_rates [--runs 15]

Streams: one activation row times a weight of 1 GiB (too large for any cache), output channels
first, through `cpu_kernels.bf16_matvec` (bf16 weight), `quant_matvec` (int8), `int4_matvec`
(nibble-packed int4), beside `generation.read_bandwidth`'s jitted reduction and f32 matrix-vector
product, all interleaved round by round so that they see the same machine. GB/s of weight bytes.

GEMMs: x [266, K] (one prompt of 266 tokens) and [2128, K] (a batch of 8) times the PaliGemma 1 3B
decoder's gate/up and down weights and a SigLIP MLP weight, bf16 in, float32 accumulation: one XLA
dot as the policy compiles it, the same with consistent arithmetic (YNNPACK without AMX), the same
through XLA's oneDNN path, the product `backend.project` runs on the weight stored output axes
first as bf16 inference holds it (its `matmul_form`: one dot, tile by tile where the contracted
axis is wide, or `cpu_kernels.bf16_gemm` on AMX), and PyTorch's; GFLOP/s, median of the runs.
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

GIB = 1 << 30
K = 2048
GEMMS = (("gate_up", 266, 2048, 16384), ("down", 266, 16384, 2048), ("gate_up", 2128, 2048, 16384),
         ("down", 2128, 16384, 2048), ("SigLIP mlp", 2048, 1152, 4304))
ONEDNN = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_ynn_fusion_type": ""}
CONSISTENT = {"xla_cpu_enable_platform_dependent_math": False}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def streams(runs: int) -> list[list[str]]:
    """GB/s (median, best) of reading 1 GiB through each kernel and the probe's two programs."""
    rows_f32 = GIB // 4 // K
    x32 = jnp.ones((rows_f32, K), jnp.float32)
    v32 = jnp.ones((K,), jnp.float32)
    xb, xf = jnp.ones((1, K), jnp.bfloat16), jnp.ones((1, K), jnp.float32)
    programs = {"probe: reduction (f32)": (jax.jit(jnp.sum), (x32,)), "probe: matrix-vector (f32)": (jax.jit(jnp.dot), (x32, v32))}
    if cpu_kernels.load():
        n = GIB // K
        programs["bf16 kernel"] = (jax.jit(cpu_kernels.bf16_matvec), (xb, jnp.ones((n // 2, K), jnp.bfloat16)))
        programs["int8 kernel"] = (jax.jit(cpu_kernels.quant_matvec), (xf, jnp.ones((n, K), jnp.int8), jnp.ones((n, 1))))
        if backend.Policy.host()._packs_int4(jnp.bfloat16):
            programs["int4 kernel (packed)"] = (jax.jit(cpu_kernels.int4_matvec),
                                                (xb, jnp.ones((2 * n, K // 2), jnp.uint8), jnp.ones((2 * n, K // 128))))
    times: dict[str, list[float]] = {name: [] for name in programs}
    for fn, args in programs.values():
        jax.block_until_ready(fn(*args))
    for _ in range(runs):  # round by round: every program sees the same minutes of the machine
        for name, (fn, args) in programs.items():
            times[name].append(_seconds(lambda: jax.block_until_ready(fn(*args))))  # noqa: B023
    probe = max(GIB / statistics.median(times[name]) for name in list(programs)[:2])
    return [[name, f"{GIB / statistics.median(t) / 1e9:.1f}", f"{GIB / min(t) / 1e9:.1f}",
             f"{GIB / statistics.median(t) / probe:.2f}"] for name, t in times.items()]


def gemms(runs: int) -> list[list[str]]:
    """GFLOP/s of a prefill's bf16 products: one XLA dot as pali-jax compiles it, XLA's oneDNN path,
    `backend.project` on the output-first weight, PyTorch."""
    import torch

    policy = backend.Policy.host()
    options = policy.compiler_options() or {}
    rows = []
    for name, m, k, n in GEMMS:
        a, b = jnp.ones((m, k), jnp.bfloat16), jnp.ones((k, n), jnp.bfloat16)
        ta, tb = torch.ones((m, k), dtype=torch.bfloat16), torch.ones((k, n), dtype=torch.bfloat16)
        dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)  # noqa: E731
        out_first = name != "SigLIP mlp"  # SigLIP's weights stay [in, out]
        projected = lambda a, w: backend.project(a, w, 1, out_first, policy)  # noqa: B023, E731
        candidates = {"xla": (jax.jit(dot, compiler_options=options), b),
                      "xla consistent": (jax.jit(dot, compiler_options={**options, **CONSISTENT}), b),
                      "xla onednn": (jax.jit(dot, compiler_options={**options, **ONEDNN}), b),
                      "project": (jax.jit(projected, compiler_options=options), b.T.copy() if out_first else b)}
        for fn, w in candidates.values():
            fn(a, w).block_until_ready()
        torch.mm(ta, tb)
        times: dict[str, list[float]] = {key: [] for key in (*candidates, "torch")}
        for _ in range(runs):
            for key, (fn, w) in candidates.items():
                times[key].append(_seconds(lambda: fn(a, w).block_until_ready()))  # noqa: B023
            times["torch"].append(_seconds(lambda: torch.mm(ta, tb)))  # noqa: B023
        rate = {key: 2 * m * k * n / statistics.median(t) / 1e9 for key, t in times.items()}
        form = policy.matmul_form(jnp.bfloat16, m, out_first, k, n)
        rows.append([f"{name} [{m}, {k}] x [{k}, {n}]", *(f"{rate[key]:.0f}" for key in times), form,
                     f"{rate['xla'] / rate['torch']:.2f}", f"{rate['project'] / rate['torch']:.2f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15)
    report.add_arguments(p)
    args = p.parse_args()
    flags = " ".join(sorted(backend.cpu_features())) or "none tracked"
    stream_rows = streams(args.runs)
    for row in stream_rows:
        print(" | ".join(row), flush=True)
    report.write(args, "cpu_rates_streams", ["reading 1 GiB", "GB/s median", "GB/s best", "x probe (median)"],
                 stream_rows, note=f"CPU flags: {flags}. One activation row; the probe is the faster of its two "
                                   f"programs (generation.read_bandwidth); {args.runs} interleaved rounds.")
    gemm_rows = gemms(max(3, args.runs // 3))
    for row in gemm_rows:
        print(" | ".join(row), flush=True)
    report.write(args, "cpu_rates_gemms", ["bf16 product", "XLA GFLOP/s", "XLA consistent arithmetic GFLOP/s",
                                           "XLA oneDNN path GFLOP/s",
                                           "backend.project GFLOP/s", "PyTorch GFLOP/s", "project's form",
                                           "XLA / PyTorch", "project / PyTorch"], gemm_rows,
                 note=f"CPU flags: {flags}. bf16 operands, float32 accumulation; XLA as backend.Policy compiles "
                      "inference programs (consistent arithmetic except on AMX CPUs), and with consistent arithmetic "
                      "(xla_cpu_enable_platform_dependent_math off); medians, interleaved.")


if __name__ == "__main__":
    main()
