"""big_vision PaliGemma `.npz` -> pali-jax directory (orbax params, config, tokenizer).

    python -m convert.big_vision SRC.npz DST [--preset NAME] [--tokenizer paligemma_tokenizer.model]
        [--dtype auto|float32|bfloat16] [--no-final-logit-softcap] [--overwrite]

Names, layouts, vocabulary and config: see `pali_jax.weights.big_vision`. The preset (default: the
one whose shapes match) decides what the shapes cannot (soft caps, PaliGemma 2 28B's query scale).
Every array of SRC must be used and every parameter filled, every value finite; arrays are read
one at a time. The tokenizer must load and fit the model before anything is read or written. DST
is written into a temporary sibling directory and renamed at the end: it exists whole or not at all.
Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pali_jax.cli import run_main
from pali_jax.model_dir import check_destination, check_tokenizer, write_model_dir
from pali_jax.weights import WeightError, big_vision, to_host

# Looked for beside SRC when --tokenizer is not given: big_vision's name, then transformers'.
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    preset: str | None = None,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    final_logit_softcap: bool = True,
    overwrite: bool = False,
) -> Path:
    """Converts a big_vision `.npz` into a pali-jax directory DST (see the module docstring)."""
    src = Path(src)
    dst = check_destination(dst, src, overwrite=overwrite)  # before any reading: fail fast
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise WeightError(f"tokenizer {tokenizer} does not exist")
    if tokenizer is None:
        tokenizer = next((src.parent / n for n in TOKENIZER_NAMES if (src.parent / n).is_file()), None)
    plan = big_vision.plan(src, dtype, preset, final_logit_softcap=final_logit_softcap)
    if tokenizer is not None:
        check_tokenizer(Path(tokenizer), plan.config, "the checkpoint's config")
    extra = {"tokenizer.model": Path(tokenizer)} if tokenizer is not None else None
    return write_model_dir(dst, plan.config, to_host(plan), None, extra, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.big_vision", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="big_vision PaliGemma checkpoint (.npz)")
    parser.add_argument("dst", help="output directory (created atomically)")
    parser.add_argument("--preset", help="e.g. paligemma2-28b-448 (default: the preset whose shapes match)")
    parser.add_argument("--tokenizer", help="sentencepiece model copied as DST/tokenizer.model "
                                            f"(default: {' or '.join(TOKENIZER_NAMES)} beside SRC)")
    parser.add_argument("--dtype", default="auto", help="auto (the file's), float32 or bfloat16")
    parser.add_argument("--no-final-logit-softcap", action="store_true",
                        help="drop Gemma 2's final logit cap (checkpoints fine-tuned by big_vision's configs)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    def body() -> None:
        out = convert(args.src, args.dst, preset=args.preset, tokenizer=args.tokenizer, dtype=args.dtype,
                      final_logit_softcap=not args.no_final_logit_softcap, overwrite=args.overwrite)
        print(f"wrote {out}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
