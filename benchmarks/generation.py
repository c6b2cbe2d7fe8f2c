"""Side-by-side generation benchmark: pali-jax against transformers, same random weights.

    python -m benchmarks.generation                   # the full table (about an hour on 2 CPU cores)
    python -m benchmarks.generation --presets paligemma-3b-224 --dtypes float32 --batch 1 8 --runs 2
    python -m benchmarks.generation --presets paligemma-3b-224 --dtypes bfloat16 --vision-layers 27 \
        --text-layers 18 --batch 1 8 --runs 2 --new-tokens 32     # full depth (peaks ~13 GB while building)

Configurations: the real widths and full vocabulary (257216) of each preset (default PaliGemma 1 3B
and PaliGemma 2 3B at 224 px) at reduced depth (--vision-layers / --text-layers, default 2 + 2), in
float32 and bfloat16. Each gets one random transformers model, saved once and converted once;
pali-jax loads the conversion with the default API (`PaliGemma.from_pretrained`), transformers the
checkpoint (eager attention). Every implementation, preset and dtype runs in its own process, which
reports its peak RSS (VmHWM: weights, runtime and scratch memory together).

Per batch size, medians of --runs runs after a warm-up: time to first token (SigLIP + prefill + one
token, compile excluded), decode ms per token ((time for N tokens - TTFT) / (N - 1)), captions/s
(batch / time for N greedy tokens; random weights never emit EOS), and the first call's extra time
(pali-jax: tracing and compiling that batch's program). Both decode the same prompts greedily and
the first rows' tokens are compared.

Beside each figure, its floor, measured on this machine in the same run: a decode step must read
every decoder weight and the tied embedding (bytes / the faster read of 1 GiB by a reduction or a
matrix-vector product) and do
2 FLOPs per weight per row; prefill must do the matmul FLOPs of SigLIP, the projector and the decoder
over the prompt, and its attention (FLOPs / the faster of JAX's and PyTorch's rates on a
[512, 2048] x [2048, 8192] matmul in that dtype).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import child as child_process
from benchmarks import report
from pali_jax.config import PaliGemmaConfig
from pali_jax.pretrained import PaliGemma

IMPLS = ("pali_jax", "transformers")
DTYPES = ("float32", "bfloat16")


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- the machine ---------------------------------------------------------------------------------
def read_bandwidth(runs: int = 7, nbytes: int = 1 << 30) -> float:
    """Bytes/s of reading 1 GiB of float32 once, the faster of a jitted reduction and a jitted
    matrix-vector product (what a decode step does): the best a decode step can hope for. On this
    machine the reduction alone measured 35-71 GB/s from one run to the next."""
    x = jnp.ones((nbytes // 4 // 2048, 2048), jnp.float32)
    v = jnp.ones((2048,), jnp.float32)
    rates = []
    for fn, args in ((jax.jit(jnp.sum), (x,)), (jax.jit(jnp.dot), (x, v))):
        fn(*args).block_until_ready()
        rates.append(nbytes / median_time(lambda: fn(*args).block_until_ready(), runs))  # noqa: B023
    return max(rates)


def matmul_rate(dtype: str, runs: int = 5, m: int = 512, k: int = 2048, n: int = 8192) -> float:
    """FLOP/s of an [m, k] @ [k, n] matmul in `dtype`, the faster of JAX (XLA) and PyTorch."""
    import torch

    flops = 2 * m * k * n
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    jax_s = median_time(lambda: dot(a, b).block_until_ready(), runs)
    ta, tb = torch.ones((m, k), dtype=getattr(torch, dtype)), torch.ones((k, n), dtype=getattr(torch, dtype))
    torch.mm(ta, tb)
    torch_s = median_time(lambda: torch.mm(ta, tb), runs)
    return flops / min(jax_s, torch_s)


# -- floors --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Work:
    """What one row costs at least: weight bytes a decode step reads, and matmul FLOPs."""

    decode_bytes: int
    decode_flops: int  # per row and step
    prefill_flops: int  # per row: SigLIP, projector, the decoder over the prompt, last logits

    @classmethod
    def of(cls, cfg: PaliGemmaConfig, itemsize: int, prompt_length: int) -> "Work":
        v, t = cfg.vision, cfg.text
        layer = t.width * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + t.num_heads * t.head_dim * t.width
        layer += 3 * t.width * t.mlp_dim  # gating (gate and up) and linear
        decoder = t.depth * layer + t.vocab_size * t.width  # the tied embedding makes the logits
        p = cfg.num_image_tokens
        vision = p * 2 * (v.patch_size**2 * 3 * v.width + v.depth * (4 * v.width**2 + 2 * v.width * v.mlp_dim))
        vision += v.depth * 4 * p * p * v.width + p * 2 * v.width * t.width  # attention, projector
        text = prompt_length * 2 * t.depth * layer + t.depth * 4 * prompt_length**2 * t.num_heads * t.head_dim
        return cls(itemsize * decoder, 2 * decoder, vision + text + 2 * t.width * t.vocab_size)

    def floors(self, batch: int, new_tokens: int, bandwidth: float, rate: float) -> dict:
        """Seconds: TTFT, one decode step, and the captions/s they allow."""
        ttft = max(batch * self.prefill_flops / rate, self.decode_bytes / bandwidth)
        step = max(self.decode_bytes / bandwidth, batch * self.decode_flops / rate)
        return {"ttft_s": ttft, "decode_s": step, "captions_per_s": batch / (ttft + (new_tokens - 1) * step)}


def decode_bytes(pg: PaliGemma) -> int:
    """Weight bytes one decode step reads: every decoder layer and the embedding (for the logits)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pg.params["llm"]))


# -- one implementation, in its own process --------------------------------------------------------
def inputs(pg_or_cfg, batch: int, prompt_tokens: int, seed: int = 0):
    """Random pixels and `<image>` x P, `<bos>`, random text, `"\\n"` (prompt_tokens after the image)."""
    cfg = getattr(pg_or_cfg, "config", pg_or_cfg)
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    text = rng.integers(3, 256000, (batch, prompt_tokens - 2))
    ids = np.concatenate(
        [np.full((batch, cfg.num_image_tokens), cfg.image_token_id), np.full((batch, 1), 2), text, np.full((batch, 1), 108)],
        axis=1,
    ).astype(np.int32)
    return pixels, ids


def measure(gen, cfg: PaliGemmaConfig, batch: int, prompt_tokens: int, new_tokens: int, runs: int) -> dict:
    """gen(pixels, ids, n) -> tokens [B, n]: first-call extra time, TTFT, decode, captions/s, tokens."""
    pixels, ids = inputs(cfg, batch, prompt_tokens)
    t0 = time.perf_counter()
    gen(pixels, ids, 1)
    first = time.perf_counter() - t0
    tokens = gen(pixels, ids, new_tokens)  # warm-up of the long call too
    ttft = median_time(lambda: gen(pixels, ids, 1), runs)
    full = median_time(lambda: gen(pixels, ids, new_tokens), runs)
    return {
        "batch": batch, "first_call_extra_s": first - ttft, "ttft_s": ttft,
        "decode_ms_per_token": (full - ttft) / (new_tokens - 1) * 1e3, "captions_per_s": batch / full,
        "tokens": np.asarray(tokens)[0].tolist() if batch == 1 else None,
    }


def pali_jax_generator(model_dir: str, dtype: str):
    pg = PaliGemma.from_pretrained(model_dir, dtype=dtype)
    return pg.config, lambda pixels, ids, n: pg.generate_ids(pixels, ids, max_new_tokens=n).tokens


def transformers_generator(model_dir: str, dtype: str):
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.set_attn_implementation("eager")
    cfg = PaliGemmaConfig.from_hf(Path(model_dir) / "config.json")

    def gen(pixels, ids, n):
        ids_t = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2).to(model.dtype), input_ids=ids_t,
                                 token_type_ids=torch.zeros_like(ids_t), attention_mask=torch.ones_like(ids_t),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].numpy()

    return cfg, gen


def child(spec: dict) -> dict:
    from benchmarks.peak_rss import peak_rss_bytes

    make = pali_jax_generator if spec["impl"] == "pali_jax" else transformers_generator
    t0 = time.perf_counter()
    cfg, gen = make(spec["model_dir"], spec["dtype"])
    load_s = time.perf_counter() - t0
    rows = [measure(gen, cfg, b, spec["prompt_tokens"], spec["new_tokens"], spec["runs"]) for b in spec["batch"]]
    return {"load_s": load_s, "rows": rows, "peak_rss_bytes": peak_rss_bytes()}


def run_child(spec: dict, tmp: Path) -> dict:
    return child_process.run("benchmarks.generation", spec, tmp)


# -- the matrix ------------------------------------------------------------------------------------
def prepare(preset_name: str, vision_layers: int, text_layers: int, dtypes, root: Path) -> dict[str, Path]:
    """One random HF checkpoint (float32) and its pali-jax conversion per dtype; returns the paths."""
    import torch

    from benchmarks.hf_reference import build, hf_config
    from pali_jax.conversion import convert_hf
    from pali_jax.config import preset

    hf_dir = root / preset_name / "hf"
    build(hf_config(preset(preset_name), vision_layers, text_layers), torch.float32).save_pretrained(hf_dir)
    gc.collect()
    paths = {"hf": hf_dir}
    for dtype in dtypes:
        paths[dtype] = convert_hf(hf_dir, root / preset_name / dtype, dtype)
    return paths


def print_table(result: dict) -> None:
    a = result["args"]
    print(f"\nText layers {a['text_layers']}, vision layers {a['vision_layers']} (real widths, vocab 257216); "
          f"{a['prompt_tokens']} prompt tokens after the image, {a['new_tokens']} new tokens; medians of {a['runs']}. "
          f"Read bandwidth {result['read_bandwidth'] / 1e9:.1f} GB/s; matmul "
          + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in result["matmul_rate"].items()) + ".")
    print(f"{'preset':<18} {'dtype':<9} {'batch':>5} {'impl':<13} {'TTFT ms':>8} {'floor':>6} {'decode ms/tok':>13} "
          f"{'floor':>6} {'captions/s':>10} {'ceiling':>7} {'1st call s':>10} {'peak RSS GB':>11}")
    for run in result["runs"]:
        impls = {name: run[name] for name in IMPLS if name in run}
        for i, batch in enumerate(a["batch"]):
            floor = run["floors"][i]
            for name, r in impls.items():
                row = r["rows"][i]
                print(f"{run['preset']:<18} {run['dtype']:<9} {batch:>5} {name:<13} {row['ttft_s'] * 1e3:>8.0f} "
                      f"{floor['ttft_s'] * 1e3:>6.0f} {row['decode_ms_per_token']:>13.1f} {floor['decode_s'] * 1e3:>6.1f} "
                      f"{row['captions_per_s']:>10.2f} {floor['captions_per_s']:>7.2f} {row['first_call_extra_s']:>10.1f} "
                      f"{r['peak_rss_bytes'] / 1e9:>11.2f}")
            if len(impls) == 2:
                ours, theirs = impls["pali_jax"]["rows"][i], impls["transformers"]["rows"][i]
                print(f"{'':<18} {'':<9} {'':>5} {'tf / pali-jax':<13} {theirs['ttft_s'] / ours['ttft_s']:>7.2f}x {'':>6} "
                      f"{theirs['decode_ms_per_token'] / ours['decode_ms_per_token']:>12.2f}x {'':>6} "
                      f"{ours['captions_per_s'] / theirs['captions_per_s']:>9.2f}x (pali-jax / tf)")
        if "same_tokens" in run:
            print(f"{'':<18} {run['dtype']:<9} greedy tokens at batch 1 equal: {run['same_tokens']}")


def write_report(args, result: dict) -> None:
    """docs/performance.md's generation section: cells are pali-jax / transformers (floor)."""
    rows = []
    for run in result["runs"]:
        impls = [run[name] for name in IMPLS if name in run]
        for i, batch in enumerate(args.batch):
            floor = run["floors"][i]

            def both(key, scale=1.0, digits=1, floor_key=None):
                cells = " / ".join(f"{r['rows'][i][key] * scale:.{digits}f}" for r in impls)
                return cells + (f" ({floor[floor_key] * scale:.{digits}f})" if floor_key else "")

            rows.append((run["preset"], run["dtype"], batch, both("ttft_s", 1e3, 0, "ttft_s"),
                         both("decode_ms_per_token", 1.0, 1) + f" ({floor['decode_s'] * 1e3:.1f})",
                         both("captions_per_s", 1.0, 2, "captions_per_s"),
                         " / ".join(f"{r['peak_rss_bytes'] / 1e9:.1f}" for r in impls),
                         run.get("same_tokens", "-") if batch == 1 else "-"))
    names = " / ".join(n for n in IMPLS if n in args.impls)
    rates = ", ".join(f"{d} {r / 1e9:.0f}" for d, r in result["matmul_rate"].items())
    report.write(args, "generation", ["preset", "dtype", "batch", "TTFT ms", "decode ms/token", "captions/s",
                                      "peak RSS GB", "same greedy tokens"], rows,
                 note=f"Cells: {names} (floor or ceiling). {args.vision_layers} vision + {args.text_layers} text layers, "
                      f"{args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, medians of {args.runs}; "
                      f"read bandwidth {result['read_bandwidth'] / 1e9:.1f} GB/s, matmul GFLOP/s {rates}.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--presets", nargs="+", default=["paligemma-3b-224", "paligemma2-3b-224"])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=16, help="text tokens after the image tokens")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("generation_benchmark.json"))
    report.add_arguments(p)
    args = p.parse_args()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(child(json.loads(args.child[0]))))
        return

    bandwidth = read_bandwidth()
    rates = {dtype: matmul_rate(dtype) for dtype in args.dtypes}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            paths = prepare(name, args.vision_layers, args.text_layers, args.dtypes, Path(tmp))
            for dtype in args.dtypes:
                cfg = PaliGemmaConfig.from_dict(json.loads((paths[dtype] / "pali_jax_config.json").read_text()))
                work = Work.of(cfg, jnp.dtype(dtype).itemsize, cfg.num_image_tokens + args.prompt_tokens)
                run = {"preset": name, "dtype": dtype, "work": dataclasses.asdict(work),
                       "floors": [work.floors(b, args.new_tokens, bandwidth, rates[dtype]) for b in args.batch]}
                for impl in args.impls:
                    spec = {"impl": impl, "model_dir": str(paths[dtype] if impl == "pali_jax" else paths["hf"]),
                            "dtype": dtype, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                            "new_tokens": args.new_tokens, "runs": args.runs}
                    run[impl] = run_child(spec, Path(tmp))
                if 1 in args.batch and len(args.impls) == 2:
                    i = args.batch.index(1)
                    run["same_tokens"] = run["pali_jax"]["rows"][i]["tokens"] == run["transformers"]["rows"][i]["tokens"]
                runs.append(run)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "read_bandwidth": bandwidth, "matmul_rate": rates, "runs": runs}
    print_table(result)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {args.json}")
    write_report(args, result)


if __name__ == "__main__":
    main()
