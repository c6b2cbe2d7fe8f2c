"""PaliGemma 1 3B at FULL depth (27 + 18 layers, random weights, bfloat16) against transformers.

    python -m benchmarks.full_depth --work /tmp/pg1-full          # build once, then measure
    python -m benchmarks.full_depth --work /tmp/pg1-full --skip-api   # only the whole-process runs

Builds (once, kept in --work) a random transformers checkpoint saved in bfloat16 (as hub
checkpoints are), its pali-jax conversion, and copies the demo model's tokenizer into both (ids it
does not know decode to nothing; the timings do not depend on the text). Then, one model in
memory at a time:

1. the default Python API (`PaliGemma.from_pretrained(dir, dtype="bfloat16")`, `generate_ids`)
   against transformers' `generate` (eager), each in its own process (benchmarks.generation's
   child): TTFT, decode ms/token and batch-8 time for 32 tokens, medians after a warm-up;
2. whole processes, as a user runs them: `python run_generate.py --model DIR --image X --prompt
   "caption en" --max-tokens 32 --dtype bfloat16 --json`, with an empty and with a warm
   compilation cache, against a fresh transformers script doing the same caption (its load
   included). run_generate's JSON says how long loading took; the rest is imports, tracing,
   compiling and compute.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pali_jax" / "assets" / "demo"
IMAGE = DEMO / "images" / "shapes_0.png"

TRANSFORMERS_SCRIPT = r"""
import sys, time
t0 = time.perf_counter()
import numpy as np, torch, PIL.Image, sentencepiece
from transformers import PaliGemmaForConditionalGeneration
t1 = time.perf_counter()
model_dir, image = sys.argv[1], sys.argv[2]
model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
model.set_attn_implementation("eager")
loaded = time.perf_counter()
cfg = model.config
size = cfg.vision_config.image_size
pixels = np.asarray(PIL.Image.open(image).convert("RGB").resize((size, size), PIL.Image.BICUBIC), np.float32) / 255
pixels = torch.tensor((pixels - 0.5) / 0.5).permute(2, 0, 1)[None].to(torch.bfloat16)
sp = sentencepiece.SentencePieceProcessor(model_file=f"{model_dir}/tokenizer.model")
n_image = (size // cfg.vision_config.patch_size) ** 2
ids = torch.tensor([[cfg.image_token_index] * n_image + [2] + sp.encode("caption en\n")])
with torch.no_grad():
    out = model.generate(pixel_values=pixels, input_ids=ids, token_type_ids=torch.zeros_like(ids),
                         attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
new = [i for i in out[0, ids.shape[1]:].tolist() if i < sp.get_piece_size()]
print(sp.decode(new))
print(f"transformers: imports {t1 - t0:.1f} s, load {loaded - t1:.1f} s, generate {time.perf_counter() - loaded:.1f} s", file=sys.stderr)
"""


def build(work: Path) -> tuple[Path, Path]:
    hf_dir, flax_dir = work / "hf", work / "flax"
    if not (hf_dir / "config.json").exists():
        import torch

        from benchmarks.hf_reference import build as build_model
        from benchmarks.hf_reference import hf_config
        from pali_jax.config import preset

        build_model(hf_config(preset("paligemma-3b-224")), torch.bfloat16).save_pretrained(hf_dir)
        shutil.copy2(DEMO / "model" / "tokenizer.model", hf_dir / "tokenizer.model")
    if not (flax_dir / "pali_jax_config.json").exists():
        subprocess.run([sys.executable, "-m", "convert.hf_to_flax", str(hf_dir), str(flax_dir)], check=True, cwd=ROOT)
    return hf_dir, flax_dir


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, done.stdout + done.stderr


def whole_process(hf_dir: Path, flax_dir: Path, runs: int) -> dict:
    cli = [sys.executable, "run_generate.py", "--model", str(flax_dir), "--image", str(IMAGE), "--prompt",
           "caption en", "--max-tokens", "32", "--dtype", "bfloat16", "--json"]
    out: dict[str, list] = {"cold": [], "warm": [], "transformers": [], "cli_json": [], "cold_load_s": [],
                            "warm_load_s": [], "transformers_load_s": []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm"):
                seconds, text = timed(cli + ["--compilation-cache", cache])
                out[kind].append(seconds)
                line = text.strip().splitlines()[-1]
                out[f"{kind}_load_s"].append(json.loads(line)["timings"]["load_s"])  # read + compile, overlapped
            out["cli_json"].append(line)
        with tempfile.NamedTemporaryFile("w", suffix=".py") as script:
            script.write(TRANSFORMERS_SCRIPT)
            script.flush()
            seconds, text = timed([sys.executable, script.name, str(hf_dir), str(IMAGE)])
            out["transformers"].append(seconds)
            out["transformers_log"] = text.strip().splitlines()[-1]
            out["transformers_load_s"].append(float(re.search(r"load ([\d.]+) s", out["transformers_log"]).group(1)))
    return out


def api(hf_dir: Path, flax_dir: Path, runs: int) -> dict:
    from benchmarks.generation import run_child

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl, model_dir in (("pali_jax", flax_dir), ("transformers", hf_dir)):
            spec = {"impl": impl, "model_dir": str(model_dir), "dtype": "bfloat16", "batch": [1, 8],
                    "prompt_tokens": 16, "new_tokens": 32, "runs": runs}
            result[impl] = run_child(spec, Path(tmp))
    return result


def write_report(args, result: dict) -> None:
    """docs/performance.md's full_depth section: pali-jax against transformers, one row per figure."""
    rows = []
    if "api" in result:
        ours, theirs = result["api"]["pali_jax"], result["api"]["transformers"]
        for o, t in zip(ours["rows"], theirs["rows"]):
            rows.append((f"API, batch {o['batch']}: time to first token, s", f"{o['ttft_s']:.2f}", f"{t['ttft_s']:.2f}"))
            rows.append((f"API, batch {o['batch']}: decode, ms/token", f"{o['decode_ms_per_token']:.0f}",
                         f"{t['decode_ms_per_token']:.0f}"))
            rows.append((f"API, batch {o['batch']}: 32 tokens, s", f"{o['batch'] / o['captions_per_s']:.2f}",
                         f"{t['batch'] / t['captions_per_s']:.2f}"))
        rows.append(("API: load, s", f"{ours['load_s']:.1f}", f"{theirs['load_s']:.1f}"))
        rows.append(("API: peak RSS, GB", f"{ours['peak_rss_bytes'] / 1e9:.1f}", f"{theirs['peak_rss_bytes'] / 1e9:.1f}"))
        rows.append(("API: same greedy tokens at batch 1", ours["rows"][0]["tokens"] == theirs["rows"][0]["tokens"], ""))
    if "process" in result:
        w = result["process"]
        tf = statistics.median(w["transformers"])
        rows.append(("whole process, empty compilation cache, s", f"{statistics.median(w['cold']):.1f}", f"{tf:.1f}"))
        rows.append(("whole process, warm compilation cache, s", f"{statistics.median(w['warm']):.1f}", f"{tf:.1f}"))
        tf_load = f"{statistics.median(w['transformers_load_s']):.1f}"
        for kind in ("cold", "warm"):  # run_generate's own figure: reading the weights, the compile overlapped
            rows.append((f"whole process, {kind} cache: load (weights read, programs compiled), s",
                         f"{statistics.median(w[f'{kind}_load_s']):.1f}", tf_load))
    report.write(args, "full_depth", ["figure", "pali-jax", "transformers"], rows,
                 note=f"PaliGemma 1 3B, 27 + 18 layers, random bfloat16 weights; medians of {args.runs}.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="where the checkpoints are built and kept")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--skip-api", action="store_true")
    p.add_argument("--skip-process", action="store_true")
    report.add_arguments(p)
    args = p.parse_args()
    hf_dir, flax_dir = build(args.work)
    result: dict = {}
    if not args.skip_api:
        result["api"] = api(hf_dir, flax_dir, args.runs)
        ours, theirs = result["api"]["pali_jax"]["rows"], result["api"]["transformers"]["rows"]
        for o, t in zip(ours, theirs):
            print(f"batch {o['batch']}: TTFT {o['ttft_s']:.2f} / {t['ttft_s']:.2f} s ({o['ttft_s'] / t['ttft_s']:.2f}x); "
                  f"decode {o['decode_ms_per_token']:.0f} / {t['decode_ms_per_token']:.0f} ms/token "
                  f"({o['decode_ms_per_token'] / t['decode_ms_per_token']:.2f}x); 32 tokens "
                  f"{o['batch'] / o['captions_per_s']:.2f} / {t['batch'] / t['captions_per_s']:.2f} s "
                  f"({t['captions_per_s'] / o['captions_per_s']:.2f}x); first call +{o['first_call_extra_s']:.1f} s")
        print(f"load {result['api']['pali_jax']['load_s']:.1f} / {result['api']['transformers']['load_s']:.1f} s; "
              f"peak RSS {result['api']['pali_jax']['peak_rss_bytes'] / 1e9:.1f} / "
              f"{result['api']['transformers']['peak_rss_bytes'] / 1e9:.1f} GB; same tokens at batch 1: "
              f"{ours[0]['tokens'] == theirs[0]['tokens']}")
    if not args.skip_process:
        w = result["process"] = whole_process(hf_dir, flax_dir, args.runs)
        cold, warm, tf = (statistics.median(w[k]) for k in ("cold", "warm", "transformers"))
        print(f"whole process: run_generate.py cold cache {cold:.1f} s ({cold / tf:.2f}x), warm {warm:.1f} s "
              f"({warm / tf:.2f}x), transformers script {tf:.1f} s; runs {w}")
    (args.work / "full_depth.json").write_text(json.dumps(result, indent=2))
    write_report(args, result)


if __name__ == "__main__":
    main()
