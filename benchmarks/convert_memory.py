"""Peak memory and time of `python -m convert.hf_to_flax` on full-width random checkpoints.

    python -m benchmarks.convert_memory --preset paligemma-3b-224 --vision-layers 1 --text-layers 1 --parity
    python -m benchmarks.convert_memory --preset paligemma-3b-224          # the full 3B (about 5.9 GB bf16)

Builds the checkpoint with transformers (random weights, saved in bfloat16), converts it in a
child process, and reports the child's peak RSS against the size of the parameters it wrote.
With --parity, also compares float32 logits against transformers (depth-reduced models only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import report
from benchmarks.hf_reference import build, hf_config
from pali_jax.config import preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paligemma-3b-224")
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--text-layers", type=int)
    p.add_argument("--parity", action="store_true", help="compare float32 logits against transformers")
    p.add_argument("--workdir", type=Path, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="write the figures here")
    report.add_arguments(p)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        cfg = hf_config(preset(args.preset), args.vision_layers, args.text_layers)
        t0 = time.perf_counter()
        model = build(cfg, torch.bfloat16)
        model.save_pretrained(work / "hf")
        build_s = time.perf_counter() - t0
        del model
        src_bytes = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))

        t0 = time.perf_counter()
        peak_file = work / "peak_rss"
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.peak_rss", str(peak_file), "convert.hf_to_flax", str(work / "hf"),
             str(work / "flax")],
            capture_output=True, text=True,
        )
        convert_s = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(proc.stderr)
        peak = int(peak_file.read_text())
        out_bytes = sum(f.stat().st_size for f in (work / "flax" / "params").rglob("*") if f.is_file())
        from pali_jax.pretrained import PaliGemma

        loaded = PaliGemma.from_pretrained(work / "flax", dtype="bfloat16")
        param_bytes = sum(x.size * x.dtype.itemsize for x in __import__("jax").tree.leaves(loaded.params))
        result = {
            "preset": args.preset, "vision_layers": loaded.config.vision.depth, "text_layers": loaded.config.text.depth,
            "params": sum(x.size for x in __import__("jax").tree.leaves(loaded.params)),
            "source_bytes": src_bytes, "output_param_bytes": param_bytes, "orbax_bytes_on_disk": out_bytes,
            "peak_rss_bytes": peak, "peak_rss_over_output": round(peak / param_bytes, 3),
            "convert_s": round(convert_s, 1), "build_and_save_s": round(build_s, 1),
        }
        del loaded
        if args.parity:
            result.update(parity(work))
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        report.write(args, "convert_memory", ["figure", "value"], report.flatten(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parity(work: Path) -> dict:
    """float32 logits of transformers (reading the bf16 checkpoint as float32) and pali-jax."""
    from transformers import PaliGemmaForConditionalGeneration

    from pali_jax.pretrained import PaliGemma

    pg = PaliGemma.from_pretrained(work / "flax", dtype="float32")
    cfg = pg.config
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    text = rng.integers(3, 256000, (1, 12))
    ids = np.concatenate([np.full((1, cfg.num_image_tokens), cfg.image_token_id), [[2]], text], 1).astype(np.int32)
    types = np.zeros_like(ids)
    types[:, -5:] = 1
    ours = np.asarray(pg.forward(pixels, ids, types))
    del pg
    ref_model = PaliGemmaForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float32).eval()
    ref_model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = ref_model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), input_ids=torch.tensor(ids).long(),
                        token_type_ids=torch.tensor(types).long()).logits.numpy()
    return {
        "logits_rel_l2": float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)),
        "logits_max_abs": float(np.abs(ours - ref).max()),
        "argmax_equal": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
    }


if __name__ == "__main__":
    main()
