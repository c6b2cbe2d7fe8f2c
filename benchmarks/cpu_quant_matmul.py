"""The compute forms of a quantised weight on this CPU, the measurement behind
`backend.Policy.quantized_form`: one PaliGemma 1 3B decoder layer's five projections (LAYER of
benchmarks/cpu_matmul.py), weights stored output axes first as CPU bf16 inference stores them,
bf16 rows, at 1, 8 and 64 rows.

    python -m benchmarks.cpu_quant_matmul [--repeats 7] [--rows 1 8 64] [--width-scale 1.0]

Forms (x [M, K] bf16; w [N, K]; every product accumulates in float32 and is rounded to bf16):
  bf16 weight       the bf16 model's product (`backend.project` on a bf16 weight): the reference
                    speed quantisation has to beat;
  dequantize        the whole weight dequantised to bf16, then the bf16 model's product (the
                    `dequantize` form; what XLA fuses on GPU and TPU);
  dequantize f32    the whole weight dequantised to float32, one float32 dot;
  dequantize ynn    `dequantize` compiled with XLA:CPU's YNNPACK fusions of elementwise ops
                    (xla_cpu_experimental_ynn_fusion_type dot + eltwise);
  tiled             `backend.project` as the CPU policy runs it (`quantized_form`: float32 tiles
                    below 16 rows, bf16 tiles above; about Policy.tile_bytes per tile) on the
                    weight as a loaded model holds it on CPU (int4 one value per int8 byte:
                    `Layout.int4_bytes`); `tiled NK` the same with N KiB tiles; `tiled jnp.int4`
                    on the jnp.int4 array;
  tiled f32 / bf16  the tiles in float32 (multiplied in float32) or in bf16 (multiplied by the bf16
                    model's product: YNNPACK's bf16 GEMM), whatever the rows;
  int8 dot          int8 only, not weight-only: the rows quantised per row (absmax / 127) and an
                    int8 x int8 -> int32 dot, rescaled (its error is the activations' rounding too);
  tiled packed      int4 only: two values per byte (`quantize.pack_int4`), unpacked inside the
                    `tiled` loop: half the bytes in RAM;
  packed kernel     int4 only: the same bytes through `cpu_kernels.int4_matvec` (what
                    `backend.project` runs on them at any row count where the install built the
                    kernels and the CPU has AVX512-BF16: bf16 inference on CPU holds int4 so);
  kernel            `cpu_kernels.quant_matvec` (what `backend.project` runs below
                    `backend._QUANT_KERNEL_ROWS` rows where the install built the kernels and the CPU
                    has AVX-512): the int8 bytes read once, converted in registers, scaled per group;
                    `bf16 kernel` the bf16 weight through `cpu_kernels.bf16_matvec`;
  amx               int8 only, where this process may use AMX: `cpu_kernels.int8_gemm` (what
                    `backend.project` runs from `backend._AMX_INT8_ROWS` rows there; below, the kernel);
  packed amx        int4 only, where this process may use AMX: the packed bytes through
                    `cpu_kernels.int4_gemm`, dequantised to bf16 a block at a time (what
                    `backend.project` runs from `backend._AMX_INT4_ROWS` rows there).
Schemes as `quantize.py` makes them: int8 per output channel, int4 in groups of 128 along K.

Timings are interleaved across forms, shuffled each round (medians and best of --repeats: the
machine is shared); the
error is the largest max-abs error over the five products relative to the largest exact value
(float64 on the bf16 rows and the dequantised weight). The table goes into docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.cpu_matmul import LAYER
from pali_jax import backend, cpu_kernels, quantize
from pali_jax.quantize import Quantization

F32 = jnp.float32
YNN_ELTWISE = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


def _project(policy):
    return lambda x, node: backend.project(x, node, 1, True, policy)


def _dequantize(dtype):
    def product(x, node):
        w = quantize.dequantize(node, dtype)
        if dtype == F32:
            return jnp.dot(w, x.astype(F32).T).T.astype(x.dtype)
        return backend.project(x, w, 1, True, backend.Policy("cpu"))

    return product


def _int8_dot(x, node):
    x32 = x.astype(F32)
    sx = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
    xq = jnp.round(x32 / sx).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, node[quantize.QVALUE], (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(F32) * sx * node[quantize.SCALE][:, 0]).astype(x.dtype)


def _tiled_packed(tile_bytes: int):
    def product(x, node):
        p, s = node[quantize.QVALUE], node[quantize.SCALE]  # [N, K / 2] nibble-packed, [N, G]
        n, k, g = p.shape[0], 2 * p.shape[1], s.shape[1]
        tile = min(n, max(1, tile_bytes // (4 * k)))
        x32 = x.astype(F32)

        def one(i):
            pt = jax.lax.dynamic_slice_in_dim(p, i * tile, tile)
            st = jax.lax.dynamic_slice_in_dim(s, i * tile, tile)
            w = (quantize.unpack_int4(pt).astype(F32).reshape(tile, g, k // g) * st[:, :, None]).reshape(tile, k)
            return jnp.dot(w, x32.T)

        y = jax.lax.map(one, jnp.arange(n // tile))  # N a multiple of the tile here
        return y.reshape(n, -1).T.astype(x.dtype)

    return product


def _tiled_in(dtype):
    """backend's tiled product with its tiles in `dtype`, whatever the policy would pick."""
    policy = backend.Policy("cpu")

    def product(x, node):
        k = node[quantize.QVALUE].shape[1]
        return backend._tiled(x.astype(dtype), node, k, True, policy.tile_rows(k, dtype)).astype(x.dtype)

    return product


def forms(scheme: str, tile_sweep: list[int]) -> dict:
    """name -> (product, compiler options beyond the policy's, operand kind)."""
    out = {
        "bf16 weight": (_project(backend.Policy("cpu")), None, "bf16"),
        "dequantize": (_dequantize(jnp.bfloat16), None, "q"),
        "dequantize f32": (_dequantize(F32), None, "q"),
        "dequantize ynn": (_dequantize(jnp.bfloat16), YNN_ELTWISE, "q"),
        "tiled": (_project(backend.Policy("cpu")), None, "held"),
        "tiled f32": (_tiled_in(F32), None, "held"),
        "tiled bf16": (_tiled_in(jnp.bfloat16), None, "held"),
    }
    if cpu_kernels.load():
        kernels = backend.Policy("cpu", backend.cpu_features() - backend.AMX_CPU_FLAGS, cpu_kernels=True)
        out["kernel"] = (_project(kernels), None, "held")
        out["bf16 kernel"] = (_project(kernels), None, "bf16")
    if cpu_kernels.amx() and scheme == "int8":
        out["amx"] = (_project(backend.Policy("cpu", backend.cpu_features(), cpu_kernels=True)), None, "held")
    for kib in tile_sweep:
        out[f"tiled {kib}K"] = (_project(backend.Policy("cpu", tile_bytes=kib << 10)), None, "held")
    if scheme == "int8":
        out["int8 dot"] = (_int8_dot, None, "q")
    else:
        out["tiled jnp.int4"] = (_project(backend.Policy("cpu")), None, "q")
        out["tiled packed"] = (_tiled_packed(backend.Policy("cpu").tile_bytes), None, "packed")
        if cpu_kernels.load():
            out["packed kernel"] = (_project(backend.Policy("cpu", backend.cpu_features() - backend.AMX_CPU_FLAGS,
                                                            cpu_kernels=True)), None, "packed")
        if cpu_kernels.amx():
            out["packed amx"] = (_project(backend.Policy("cpu", backend.cpu_features(), cpu_kernels=True)), None, "packed")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--schemes", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    p.add_argument("--width-scale", type=float, default=1.0)
    p.add_argument("--tile-kib", type=int, nargs="*", default=[512, 2048, 8192, 16384], help="tile sizes tried beside the policy's")
    p.add_argument("--forms", nargs="*", help="only these forms (and 'bf16 weight', the reference); default all")
    report.add_arguments(p)
    args = p.parse_args()
    features = backend.cpu_features()
    options = backend.Policy.host().compiler_options()
    print(f"cpu: {backend.cpu_model()}")
    print(f"flags: {' '.join(sorted(features)) or '(none of the tracked ones)'}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, policy tile {backend.Policy().tile_bytes >> 10} KiB")
    shapes = [(n, max(128, int(k * args.width_scale)), max(128, int(o * args.width_scale))) for n, k, o in LAYER]
    rng = np.random.default_rng(0)
    columns = ["scheme", "form", "rows", "ms/layer median (best)", "x bf16 weight (median)", "rel. error"]
    print(" | ".join(columns))
    table = []
    for scheme in args.schemes:
        quant = Quantization(scheme)
        nodes, bf16, packed = [], [], []
        for _, k, o in shapes:
            w = rng.standard_normal((o, k)).astype(np.float32) * 0.02  # [N, K], output-first
            node = jax.device_put(quantize.quantize(w, quant, (1,)))
            nodes.append(node)
            bf16.append(jnp.asarray(w, jnp.bfloat16))
            if scheme == "int4":
                packed.append({**node, quantize.QVALUE: quantize.pack_int4(node[quantize.QVALUE])})
        deq64 = [np.asarray(quantize.dequantize(n, F32), np.float64) for n in nodes]
        held = [{**n, quantize.QVALUE: n[quantize.QVALUE].astype(jnp.int8)} for n in nodes]  # Layout.int4_bytes
        operands = {"q": nodes, "held": held, "bf16": bf16, "packed": packed}
        candidates = forms(scheme, args.tile_kib)
        if args.forms:
            unknown = set(args.forms) - set(candidates)
            if unknown:
                p.error(f"unknown forms {sorted(unknown)} for {scheme}; choose from {sorted(candidates)}")
            candidates = {k: v for k, v in candidates.items() if k in args.forms or k == "bf16 weight"}
        for m in args.rows:
            xs = [jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16) for _, k, _ in shapes]
            runs, errors = {}, {}
            for name, (product, extra, kind) in candidates.items():
                def layer(xs, ws, product=product):
                    return [product(x, w) for x, w in zip(xs, ws)]

                run = jax.jit(layer, compiler_options={**(options or {}), **(extra or {})})
                ws = operands[kind]
                outs = run(xs, ws)
                ref = deq64 if kind != "bf16" else [np.asarray(w, np.float64) for w in ws]
                errors[name] = max(float(np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64) @ r.T).max()
                                         / np.abs(np.asarray(x, np.float64) @ r.T).max()) for y, x, r in zip(outs, xs, ref))
                runs[name] = (run, ws)
            times = {name: [] for name in runs}
            order = list(runs)
            for _ in range(args.repeats):  # interleaved, so every form sees the same machine, in a new
                rng.shuffle(order)  # order each round: a form runs slower after some others (threads asleep)
                for name in order:
                    run, ws = runs[name]
                    t0 = time.perf_counter()
                    jax.block_until_ready(run(xs, ws))
                    times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["bf16 weight"])
            for name, t in times.items():
                med = statistics.median(t)
                table.append([scheme, name, m, f"{med * 1e3:.1f} ({min(t) * 1e3:.1f})", f"{med / base:.2f}",
                              f"{errors[name]:.1e}"])
                print(" | ".join(str(c) for c in table[-1]), flush=True)
    report.write(args, "cpu_quant_matmul", columns, table, note=(
        f"CPU flags: {' '.join(sorted(features)) or 'none tracked'}. One PaliGemma 1 3B decoder layer's five "
        "products per form, weights output-first, bf16 rows; compiled with backend.Policy's CPU options; "
        "int4 in groups of 128. Errors: largest max-abs error over the five products relative to the largest "
        "exact value (float64 on the same rows and the dequantised weight; the bf16 weight's own for 'bf16 weight')."))


if __name__ == "__main__":
    main()
