"""Decode cost against cache capacity: the same 32 tokens with a cache sized for 32 or for 1024.

    python -m benchmarks.decode_capacity [--runs 7] [--model pali_jax/assets/demo/model]

The bundled demo model's shapes (the smallest model, where attention over the cache weighs most
against the weights) with random weights and the image token as its only stop token (never emitted), so every call emits exactly 32
tokens; one run sizes the cache for max_new_tokens=32, the other for 1024 (`cache_length`).
Decode ms/token = (time for 32 tokens - time for 1 token) / 31, medians, both in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from benchmarks import report
from pali_jax import backend
from pali_jax.config import PaliGemmaConfig
from pali_jax.generate import MIN_TEXT_BUCKET
from pali_jax.paligemma import PaliGemmaModel, to_layout
from pali_jax.pretrained import PaliGemma

DEMO = Path(__file__).resolve().parents[1] / "pali_jax" / "assets" / "demo" / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEMO, help="a converted directory (only its config is used)")
    p.add_argument("--runs", type=int, default=7)
    report.add_arguments(p)
    args = p.parse_args()
    cfg = PaliGemmaConfig.from_dict(json.loads((args.model / "pali_jax_config.json").read_text()))
    cfg = dataclasses.replace(cfg, eos_token_ids=(cfg.image_token_id,), text=dataclasses.replace(cfg.text, max_positions=1 << 16))
    size = cfg.image_size
    pixels = np.zeros((1, size, size, 3), np.float32)
    ids = np.concatenate([np.full((1, cfg.num_image_tokens), cfg.image_token_id), [[2, 5, 6, 7]]], 1).astype(np.int32)
    params = nn.meta.unbox(PaliGemmaModel(cfg).init(jax.random.PRNGKey(0), pixels, ids)["params"])
    layout = backend.inference_layout(np.float32)
    pg = PaliGemma(cfg, jax.device_put(to_layout(params, backend.CHECKPOINT_LAYOUT, layout)), layout=layout)
    prompt = cfg.num_image_tokens + MIN_TEXT_BUCKET
    results, rows = {}, []
    for capacity in (32, 1024):
        def run(n: int) -> float:
            t0 = time.perf_counter()
            out = pg.generate_ids(pixels, ids, max_new_tokens=n, cache_length=prompt + capacity)
            assert out.lengths[0] == n, out.lengths
            return time.perf_counter() - t0

        run(32), run(1)  # compile both programs
        full = statistics.median(run(32) for _ in range(args.runs))
        first = statistics.median(run(1) for _ in range(args.runs))
        results[capacity] = (full - first) / 31 * 1e3
        print(f"cache for {capacity:>4} new tokens ({prompt + capacity:>5} slots): decode {results[capacity]:.3f} ms/token")
        rows.append((capacity, prompt + capacity, results[capacity], results[capacity] / results[32]))
    print(f"ratio 1024 / 32: {results[1024] / results[32]:.3f}")
    report.write(args, "decode_capacity", ["cache for new tokens", "cache slots", "decode ms/token", "against 32"], rows,
                 note=f"Demo model shapes, random weights, 32 tokens, medians of {args.runs}.")


if __name__ == "__main__":
    main()
