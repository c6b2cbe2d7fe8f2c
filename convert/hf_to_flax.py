"""Hugging Face PaliGemma safetensors -> a converted pali-jax directory (orbax params + config).

    python -m convert.hf_to_flax SRC DST [--dtype auto|float32|bfloat16] [--overwrite]

SRC is an HF checkpoint directory: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json, in any key layout transformers has written. Tensors are read one at
a time (`pali_jax.hf_weights`), so peak memory is the output plus one tensor; coverage is strict.
DST is written into a temporary sibling directory and renamed at the end: it exists whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pali_jax.errors import UserError
from pali_jax.hf_weights import ConversionError, load_hf
from pali_jax.model_dir import write_model_dir


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Converts SRC into a pali-jax directory DST (orbax params, config, tokenizer files)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (pass --overwrite to replace it)")
    cfg, params = load_hf(src, dtype)
    return write_model_dir(dst, cfg, params, src)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.hf_to_flax", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HF PaliGemma checkpoint directory")
    parser.add_argument("dst", help="output directory (created atomically)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32 or bfloat16")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.dtype, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
