"""Side-by-side generation timings: pali-jax against transformers, same random weights.

    python -m benchmarks.generation                       # PaliGemma 1 3B widths, 2+2 layers, float32, batch 1 and 8

Per batch size: time to first token (prefill incl. SigLIP, compile excluded), decode ms per token,
decode tokens/s, and pali-jax's first-call compile time; medians of --runs runs after a warm-up.
Both decode the same prompts greedily and the tokens are compared. The floor beside decode is the
bytes of weights a decode step must read (decoder layers + the tied embedding for the logits)
divided by a read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.hf_reference import build, hf_config
from pali_jax.config import preset
from pali_jax.pretrained import PaliGemma

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(runs: int = 5, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a jitted full read (sum) of a 1 GiB float32 array: what a decode step can hope for."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return nbytes / median_time(lambda: total(x).block_until_ready(), runs)


def decode_bytes(pg: PaliGemma) -> int:
    """Weight bytes one decode step reads: every decoder layer and the embedding (for the logits)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pg.params["llm"]))


def inputs(pg: PaliGemma, batch: int, prompt_tokens: int, seed: int = 0):
    cfg = pg.config
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    text = rng.integers(3, 256000, (batch, prompt_tokens - 2))
    ids = np.concatenate(
        [np.full((batch, cfg.num_image_tokens), cfg.image_token_id), np.full((batch, 1), 2), text, np.full((batch, 1), 108)],
        axis=1,
    ).astype(np.int32)
    return pixels, ids


def bench_jax(pg: PaliGemma, pixels, ids, new_tokens: int, runs: int) -> dict:
    def gen(n):
        return pg.generate_ids(pixels.astype(pg.dtype), ids, max_new_tokens=n)  # returns host arrays

    t0 = time.perf_counter()
    gen(1)
    first_call = time.perf_counter() - t0
    steady_first = median_time(lambda: gen(1), runs)
    full = median_time(lambda: gen(new_tokens), runs)
    tokens = gen(new_tokens).tokens
    return {
        "compile_s": first_call - steady_first, "ttft_s": steady_first,
        "decode_ms_per_token": (full - steady_first) / (new_tokens - 1) * 1e3, "tokens": tokens,
    }


def bench_torch(model, pixels, ids, new_tokens: int, runs: int) -> dict:
    pv = torch.tensor(pixels).permute(0, 3, 1, 2).to(model.dtype)
    ids_t = torch.tensor(ids, dtype=torch.long)

    def gen(n):
        with torch.no_grad():
            return model.generate(pixel_values=pv, input_ids=ids_t, token_type_ids=torch.zeros_like(ids_t),
                                  attention_mask=torch.ones_like(ids_t), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)

    gen(2)
    first = median_time(lambda: gen(1), runs)
    full = median_time(lambda: gen(new_tokens), runs)
    return {
        "ttft_s": first, "decode_ms_per_token": (full - first) / (new_tokens - 1) * 1e3,
        "tokens": gen(new_tokens)[:, ids.shape[1]:].numpy(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paligemma-3b-224")
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=16, help="text tokens after the image tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="pali-jax only")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        model = build(hf_config(preset(args.preset), args.vision_layers, args.text_layers), torch.float32)
        model.save_pretrained(tmp)
        pg = PaliGemma.from_pretrained(tmp, dtype=args.dtype)
    model = model.to(TORCH_DTYPES[args.dtype])
    bandwidth = read_bandwidth()
    floor_ms = decode_bytes(pg) / bandwidth * 1e3
    rows = []
    for batch in args.batch:
        pixels, ids = inputs(pg, batch, args.prompt_tokens)
        ours = bench_jax(pg, pixels, ids, args.new_tokens, args.runs)
        row = {"batch": batch, "pali_jax": ours, "floor_decode_ms_per_token": floor_ms}
        if not args.no_torch:
            ref = bench_torch(model, pixels, ids, args.new_tokens, args.runs)
            row["transformers"] = ref
            row["same_tokens"] = bool(np.array_equal(ours["tokens"], ref["tokens"]))
        rows.append(row)

    print(f"{args.preset} widths, {args.vision_layers} vision + {args.text_layers} text layers, {args.dtype}, "
          f"{args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, median of {args.runs}; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s, decode reads {decode_bytes(pg) / 1e9:.2f} GB/step")
    header = f"{'batch':>5} {'impl':>12} {'TTFT ms':>9} {'decode ms/tok':>14} {'tok/s':>8} {'floor ms':>9} {'compile s':>10}"
    print(header)
    for row in rows:
        for name in ("pali_jax", "transformers"):
            if name not in row:
                continue
            r = row[name]
            tps = row["batch"] * 1e3 / r["decode_ms_per_token"]
            compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            print(f"{row['batch']:>5} {name:>12} {r['ttft_s'] * 1e3:>9.1f} {r['decode_ms_per_token']:>14.1f} "
                  f"{tps:>8.1f} {floor_ms:>9.1f} {compile_s:>10}")
        if "transformers" in row:
            ratio = row["transformers"]["decode_ms_per_token"] / row["pali_jax"]["decode_ms_per_token"]
            print(f"{'':>5} {'ratio':>12} {row['transformers']['ttft_s'] / row['pali_jax']['ttft_s']:>9.2f}x "
                  f"{ratio:>13.2f}x  (transformers / pali-jax; tokens equal: {row['same_tokens']})")
    if args.json:
        for row in rows:
            for name in ("pali_jax", "transformers"):
                if name in row:
                    row[name]["tokens"] = row[name]["tokens"].tolist()
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "read_bandwidth": bandwidth,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
