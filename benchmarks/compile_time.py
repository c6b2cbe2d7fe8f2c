"""Compile time: process start to first token, without and with JAX's persistent compilation cache,
and how many programs 20 different prompt lengths compile.

    python -m benchmarks.compile_time            # PaliGemma 1 3B widths, 2 + 2 layers, float32
    python -m benchmarks.compile_time --stacked  # the decoder layers stacked (fine-tuning's layout)

Converts a random model once, then starts `python -m benchmarks.compile_time --child` four times:
without a cache, then with one fresh cache directory (the first process fills it, the next two
read it); --repeats rounds of that, reporting medians (single rounds vary on a shared machine).
Each child loads the model as run_generate.py does (each decoder
layer on its own weights, the default layout) unless --stacked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

import numpy as np


def child(model_dir: str, cache: str | None, stacked: bool) -> None:
    """Runs in a fresh process: load, generate one token, report seconds since the parent launched it."""
    t_launch = float(os.environ["BENCH_T0"])
    from pali_jax import PaliGemma, enable_compilation_cache
    from pali_jax.backend import CHECKPOINT_LAYOUT

    if cache:
        enable_compilation_cache(cache)
    pg = PaliGemma.from_pretrained(model_dir, layout=CHECKPOINT_LAYOUT if stacked else None)
    t_loaded = time.time()
    cfg = pg.config
    ids = np.concatenate([np.full((1, cfg.num_image_tokens), cfg.image_token_id), [[2, 1000, 2000, 108]]], 1)
    pixels = np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32)
    pg.generate_ids(pixels, ids, max_new_tokens=1)
    done = time.time()
    print(json.dumps({"to_first_token_s": done - t_launch, "load_s": t_loaded - t_launch, "first_call_s": done - t_loaded}))


RUNS = ("no_cache", "cold_cache", "warm_cache", "warm_cache_again")


def count_programs(model_dir: str) -> dict:
    """Programs traced for 20 prompt lengths between 1 and 200 text tokens."""
    from pali_jax import PaliGemma

    pg = PaliGemma.from_pretrained(model_dir)
    cfg = pg.config
    lengths = np.linspace(1, 200, 20).astype(int)
    pixels = np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32)
    for n in lengths:
        ids = np.concatenate([np.full((1, cfg.num_image_tokens), cfg.image_token_id), np.full((1, n), 1000)], 1)
        pg.generate_ids(pixels, ids, max_new_tokens=4)
    return {"prompt_text_lengths": lengths.tolist(), "programs_compiled": pg.generator.traces}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "CACHE"), help=argparse.SUPPRESS)
    p.add_argument("--preset", default="paligemma-3b-224")
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--stacked", action="store_true", help="load with stacked decoder layers (backend.CHECKPOINT_LAYOUT)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the four processes; medians are reported")
    p.add_argument("--json", type=Path)
    report.add_arguments(p)
    args = p.parse_args()
    if args.child:
        child(args.child[0], None if args.child[1] == "-" else args.child[1], args.stacked)
        return

    import torch

    from benchmarks.hf_reference import build, hf_config
    from convert.hf_to_flax import convert
    from pali_jax.config import preset

    with tempfile.TemporaryDirectory() as tmp:
        build(hf_config(preset(args.preset), args.vision_layers, args.text_layers), torch.float32).save_pretrained(
            Path(tmp) / "hf")
        convert(Path(tmp) / "hf", Path(tmp) / "flax")
        samples: dict[str, list[dict]] = {name: [] for name in RUNS}
        for repeat in range(args.repeats):  # each repeat starts from an empty cache directory
            for name in RUNS:
                cache = "-" if name == "no_cache" else f"{tmp}/xla{repeat}"
                env = {**os.environ, "BENCH_T0": repr(time.time())}
                cmd = [sys.executable, "-m", "benchmarks.compile_time", "--child", f"{tmp}/flax", cache]
                out = subprocess.run(cmd + ["--stacked"] * args.stacked, capture_output=True, text=True, env=env, check=True)
                samples[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in samples.items()}
        ratios = [w["to_first_token_s"] / c["to_first_token_s"] for w, c in zip(samples["warm_cache"], samples["cold_cache"])]
        result = {"runs": runs, "samples": samples, "warm_over_cold": runs["warm_cache"]["to_first_token_s"] / runs["cold_cache"]["to_first_token_s"],
                  "warm_over_cold_each": ratios, **count_programs(f"{tmp}/flax")}
    print(f"medians of {args.repeats} runs each:")
    for name, r in runs.items():
        print(f"{name:>17}: first token {r['to_first_token_s']:6.2f} s after launch "
              f"(load {r['load_s']:.2f} s, first call {r['first_call_s']:.2f} s)")
    print(f"warm / cold cache: {result['warm_over_cold']:.2f} (each repeat: {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"programs for 20 prompt lengths (1..200 text tokens): {result['programs_compiled']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    rows = [(name.replace("_", " "), r["to_first_token_s"], r["load_s"], r["first_call_s"]) for name, r in runs.items()]
    report.write(args, "compile_time", ["persistent cache", "first token after launch, s", "load, s", "first call, s"],
                 rows, note=f"Medians of {args.repeats} rounds; warm / cold: {result['warm_over_cold']:.2f}; "
                            f"programs compiled for 20 prompt lengths (1..200 text tokens): {result['programs_compiled']}.")


if __name__ == "__main__":
    main()
