"""Peak memory and time of `python -m convert.big_vision` on a full-width random big_vision `.npz`.

    python -m benchmarks.convert_npz_memory --preset paligemma-3b-224     # the full 3B (about 5.9 GB bf16)
    python -m benchmarks.convert_npz_memory --preset paligemma-3b-224 --vision-layers 1 --text-layers 1

Writes the checkpoint as big_vision publishes it (one `.npz`, `params/...` names, big_vision
layouts, bfloat16 as 2-byte void, vocabulary 257152), member by member from random numbers
without holding the model in memory, converts it in a child process (`benchmarks.peak_rss`), and
reports the child's peak RSS against the size of the parameters it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from benchmarks import report
from pali_jax.config import preset
from pali_jax.paligemma import abstract_params
from pali_jax.weights.big_vision import big_vision_arrays

BF16 = np.dtype(ml_dtypes.bfloat16)
_CHUNK = 16 << 20  # elements per random chunk


def reduced(name: str, vision_layers: int | None, text_layers: int | None):
    cfg = preset(name)
    if vision_layers:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, depth=vision_layers))
    if text_layers:
        layers = cfg.text.sliding_layers[:text_layers] if cfg.text.sliding_layers else ()
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, depth=text_layers, sliding_layers=layers))
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=257152))


def write_random_npz(path: Path, cfg, seed: int = 0) -> int:
    """A big_vision-style bf16 `.npz` of random weights, one member and chunk at a time; returns its bytes."""
    rng = np.random.default_rng(seed)
    shapes = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), BF16), s.shape), abstract_params(cfg))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, view in big_vision_arrays(cfg, shapes):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("V2")), "fortran_order": False,
                      "shape": view.shape}
            with zf.open(f"params/{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                left = math.prod(view.shape)
                while left:
                    n = min(left, _CHUNK)
                    f.write((rng.standard_normal(n, np.float32) * 0.02).astype(BF16).tobytes())
                    left -= n
    return path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paligemma-3b-224")
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--text-layers", type=int)
    p.add_argument("--workdir", type=Path, help="where files go (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="write the figures here")
    report.add_arguments(p)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        cfg = reduced(args.preset, args.vision_layers, args.text_layers)
        t0 = time.perf_counter()
        src_bytes = write_random_npz(work / "pt_224.bf16.npz", cfg)
        write_s = time.perf_counter() - t0
        peak_file = work / "peak_rss"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.peak_rss", str(peak_file), "convert.big_vision",
             str(work / "pt_224.bf16.npz"), str(work / "flax"),
             *(() if args.vision_layers or args.text_layers else ("--preset", args.preset))],  # a preset's depths are whole
            capture_output=True, text=True,
        )
        convert_s = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(proc.stderr)
        peak = int(peak_file.read_text())
        files = [f for f in (work / "flax" / "params").rglob("*") if f.is_file()]
        out_bytes = sum(f.stat().st_size for f in files)
        leaves = jax.tree.leaves(abstract_params(cfg))
        param_bytes = sum(math.prod(x.shape) * 2 for x in leaves)
        result = {
            "preset": args.preset, "vision_layers": cfg.vision.depth, "text_layers": cfg.text.depth,
            "params": sum(math.prod(x.shape) for x in leaves), "source_bytes": src_bytes,
            "output_param_bytes": param_bytes, "orbax_bytes_on_disk": out_bytes, "peak_rss_bytes": peak,
            "peak_rss_over_output": round(peak / param_bytes, 3), "convert_s": round(convert_s, 1),
            "write_npz_s": round(write_s, 1),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        report.write(args, "convert_npz_memory", ["figure", "value"], report.flatten(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
