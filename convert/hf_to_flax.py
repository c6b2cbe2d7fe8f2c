"""Hugging Face PaliGemma safetensors -> a converted pali-jax directory (orbax params + config).

    python -m convert.hf_to_flax SRC DST [--dtype auto|float32|bfloat16] [--overwrite]

SRC is an HF checkpoint directory: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json, in any key layout transformers has written. Tensors are read one at
a time (`pali_jax.weights`), so peak memory is the output plus one tensor; coverage is strict,
and integer or non-finite weights are refused. A tokenizer.model beside the weights must load and
fit the model's vocabulary. DST is written into a temporary sibling and renamed at the end (it
exists whole or not at all), with a manifest (`python -m convert.verify DST` checks it). DST may
not be empty, the current directory or above it, SRC or a directory holding SRC; --overwrite
replaces only an empty directory or an earlier conversion. Exit codes: 0, 2 (one line on stderr),
130 (interrupted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pali_jax.cli import run_main
from pali_jax.model_dir import check_destination, check_tokenizer, write_model_dir
from pali_jax.weights import hf, to_host


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Converts SRC into a pali-jax directory DST (orbax params, config, tokenizer files, manifest)."""
    src = Path(src)
    dst = check_destination(dst, src, overwrite=overwrite)  # before any reading: fail fast
    plan = hf.plan(src, dtype)
    if (src / "tokenizer.model").exists():  # else arrays-only use (generate_ids); text prompts will say it is missing
        check_tokenizer(src / "tokenizer.model", plan.config)
    return write_model_dir(dst, plan.config, to_host(plan), src, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m convert.hf_to_flax", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF PaliGemma checkpoint directory")
    parser.add_argument("dst", help="output directory (created atomically)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32 or bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is an earlier conversion")
    args = parser.parse_args(argv)

    def body() -> None:
        out = convert(args.src, args.dst, args.dtype, args.overwrite)
        print(f"wrote {out}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
