"""Time per mask of the segmentation VQ-VAE decoder (`pali_jax.segmentation.MaskDecoder.decode`) on CPU.

    python -m benchmarks.mask_decoder [--vae vae-oid.npz] [--batches 1 16] [--runs 20]

Without --vae, random weights of vae-oid.npz's shapes (codebook 128 x 512, decoder widths 128,
64, 32, 16: what big_vision's decoder builds). Reports the median over --runs calls after a
warm-up (compiling excluded), per call and per mask, for each batch size.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks import report
from pali_jax.segmentation import MaskDecoder


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"_vq_vae._embedding": rng.standard_normal((128, 512), np.float32)}

    def conv(name, shape):
        w[name + ".weight"] = rng.standard_normal(shape, np.float32) * 0.05
        w[name + ".bias"] = np.zeros(shape[0], np.float32)

    conv("decoder.0", (128, 512, 1, 1))
    for res in ("decoder.2.net", "decoder.3.net"):
        conv(res + ".0", (128, 128, 3, 3)), conv(res + ".2", (128, 128, 3, 3)), conv(res + ".4", (128, 128, 1, 1))
    for name, (cin, cout) in zip(("decoder.4", "decoder.6", "decoder.8", "decoder.10"),
                                 ((128, 128), (128, 64), (64, 32), (32, 16))):
        w[name + ".weight"] = rng.standard_normal((cin, cout, 4, 4), np.float32) * 0.05
        w[name + ".bias"] = np.zeros(cout, np.float32)
    conv("decoder.12", (1, 16, 1, 1))
    return w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", help="vae-oid.npz (default: random weights of its shapes)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--runs", type=int, default=20)
    report.add_arguments(p)
    args = p.parse_args()
    decoder = MaskDecoder.from_npz(args.vae) if args.vae else MaskDecoder(random_weights())
    rng = np.random.default_rng(0)
    results = []
    for batch in args.batches:
        codes = rng.integers(0, 128, (batch, 16))
        decoder.decode(codes)  # compile
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            decoder.decode(codes)
            times.append(time.perf_counter() - t0)
        median = float(np.median(times))
        results.append({"batch": batch, "median_ms_per_call": round(median * 1e3, 3),
                        "median_ms_per_mask": round(median * 1e3 / batch, 3), "runs": args.runs})
    print(json.dumps(results, indent=2))
    report.write(args, "mask_decoder", ["batch", "ms per call", "ms per mask"],
                 [(r["batch"], r["median_ms_per_call"], r["median_ms_per_mask"]) for r in results],
                 note=f"{'vae-oid.npz' if args.vae else 'Random weights of vae-oid.npz shapes'}; medians of "
                      f"{args.runs} calls after compiling.")


if __name__ == "__main__":
    main()
