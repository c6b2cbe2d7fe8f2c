"""GPU check: full-size PaliGemma 1 3B and PaliGemma 2 3B, random bfloat16 weights, greedy decoding.

    bash benchmarks/gpu_check.sh          # or: python -m benchmarks.gpu_check [--no-torch]

Prints per model: time to first token at 224 px (batch 1, compile excluded), decode ms/token at
batch 1 against the HBM floor (bytes of weights a decode step reads / measured copy bandwidth),
captions/s at batch 64 with 20 new tokens, and transformers' figures for the same when torch with
CUDA is available. Weights are random (initialised on the device, nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.generation import decode_bytes, inputs, median_time
from pali_jax import backend
from pali_jax.config import preset
from pali_jax.paligemma import PaliGemmaModel, to_layout
from pali_jax.pretrained import PaliGemma


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s moved by a jitted elementwise pass over a 4 GiB bf16 array (one read + one write)."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    step = jax.jit(lambda a: a + 1)
    step(x).block_until_ready()
    return 2 * nbytes / median_time(lambda: step(x).block_until_ready(), 5)


def random_model(name: str) -> PaliGemma:
    cfg = preset(name)
    model = PaliGemmaModel(cfg, jnp.bfloat16)
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.bfloat16)
    ids = jnp.zeros((1, cfg.num_image_tokens + 1), jnp.int32)
    init = jax.jit(lambda key: jax.tree.map(lambda x: x.astype(jnp.bfloat16), nn.meta.unbox(model.init(key, pixels, ids)["params"])))
    layout = backend.inference_layout(jnp.bfloat16)
    params = to_layout(init(jax.random.PRNGKey(0)), backend.CHECKPOINT_LAYOUT, layout)
    return PaliGemma(cfg, params, jnp.bfloat16, layout=layout)


def bench_pali_jax(pg: PaliGemma, runs: int) -> dict:
    pixels, ids = inputs(pg, 1, 16)
    gen = lambda p, i, n: pg.generate_ids(p, i, max_new_tokens=n)  # noqa: E731
    t0 = time.perf_counter()
    gen(pixels, ids, 1)
    compile_s = time.perf_counter() - t0
    ttft = median_time(lambda: gen(pixels, ids, 1), runs)
    full = median_time(lambda: gen(pixels, ids, 33), runs)
    pixels64, ids64 = inputs(pg, 64, 16)
    gen(pixels64, ids64, 20)
    batch_s = median_time(lambda: gen(pixels64, ids64, 20), runs)
    return {"compile_s": compile_s, "ttft_ms": ttft * 1e3, "decode_ms_per_token": (full - ttft) / 32 * 1e3,
            "captions_per_s_batch64": 64 / batch_s}


def bench_transformers(name: str, runs: int) -> dict | None:
    try:
        import torch

        from benchmarks.hf_reference import hf_config
        from transformers import PaliGemmaForConditionalGeneration
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    cfg = preset(name)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = PaliGemmaForConditionalGeneration(hf_config(cfg)).eval()
        torch.set_default_dtype(torch.float32)

    def gen(batch, n):
        rng = np.random.default_rng(0)
        pv = torch.tensor(rng.uniform(-1, 1, (batch, 3, cfg.image_size, cfg.image_size)), dtype=torch.bfloat16, device="cuda")
        text = rng.integers(3, 256000, (batch, 14))
        ids = np.concatenate([np.full((batch, cfg.num_image_tokens), cfg.image_token_id), np.full((batch, 1), 2), text,
                              np.full((batch, 1), 108)], 1)
        ids_t = torch.tensor(ids, device="cuda")

        def run():
            with torch.no_grad():
                model.generate(pixel_values=pv, input_ids=ids_t, token_type_ids=torch.zeros_like(ids_t),
                               attention_mask=torch.ones_like(ids_t), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
        run()
        return median_time(run, runs)

    ttft, full, batch_s = gen(1, 1), gen(1, 33), gen(64, 20)
    del model
    torch.cuda.empty_cache()
    return {"ttft_ms": ttft * 1e3, "decode_ms_per_token": (full - ttft) / 32 * 1e3, "captions_per_s_batch64": 64 / batch_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["paligemma-3b-224", "paligemma2-3b-224"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", type=Path)
    report.add_arguments(p)
    args = p.parse_args()
    print(f"devices: {jax.devices()}")
    bandwidth = copy_bandwidth()
    print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    results = {}
    for name in args.models:
        pg = random_model(name)
        floor_ms = decode_bytes(pg) / bandwidth * 1e3
        ours = bench_pali_jax(pg, args.runs)
        del pg
        ref = None if args.no_torch else bench_transformers(name, args.runs)
        results[name] = {"pali_jax": ours, "transformers": ref, "hbm_floor_decode_ms": floor_ms}
        print(f"\n{name} (bfloat16, random weights)")
        print(f"  pali-jax:     TTFT {ours['ttft_ms']:.1f} ms, decode {ours['decode_ms_per_token']:.2f} ms/token "
              f"(HBM floor {floor_ms:.2f} ms, {ours['decode_ms_per_token'] / floor_ms:.2f}x), "
              f"{ours['captions_per_s_batch64']:.1f} captions/s at batch 64, compile {ours['compile_s']:.1f} s")
        if ref:
            print(f"  transformers: TTFT {ref['ttft_ms']:.1f} ms, decode {ref['decode_ms_per_token']:.2f} ms/token, "
                  f"{ref['captions_per_s_batch64']:.1f} captions/s at batch 64")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    rows = [(name, impl, r[impl]["ttft_ms"], r[impl]["decode_ms_per_token"], r["hbm_floor_decode_ms"],
             r[impl]["captions_per_s_batch64"], r[impl].get("compile_s", "-"))
            for name, r in results.items() for impl in ("pali_jax", "transformers") if r[impl]]
    report.write(args, "gpu_check", ["model", "implementation", "TTFT ms", "decode ms/token", "HBM floor ms/token",
                                     "captions/s at batch 64", "compile s"], rows,
                 note=f"bfloat16, random weights, medians of {args.runs}; measured copy bandwidth "
                      f"{bandwidth / 1e12:.2f} TB/s.")


if __name__ == "__main__":
    main()
