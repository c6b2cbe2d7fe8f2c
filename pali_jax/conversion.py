"""Conversions between checkpoint formats, and the check of a converted directory.

    pali-jax convert SRC DST [--dtype auto|float32|bfloat16] [--quantize int8|int4] [--overwrite]  HF -> pali-jax
    pali-jax convert-big-vision SRC.npz DST [--preset NAME] [--tokenizer FILE] [--dtype ...]
        [--no-final-logit-softcap] [--overwrite]                                     big_vision -> pali-jax
    pali-jax export-big-vision DIR OUT.npz [--dtype float32|bfloat16] [--overwrite] pali-jax -> big_vision
    pali-jax verify DIR                                                              sizes and sha256

(`python -m convert.hf_to_flax`, `convert.big_vision`, `convert.to_big_vision` and `convert.verify`
in the repository run the same commands.)

HF: SRC is a checkpoint directory (config.json plus model.safetensors, or shards listed in
model.safetensors.index.json), in any key layout transformers has written; tensors are read one at
a time (`pali_jax.weights`), coverage is strict, and integer or non-finite weights are refused. A
tokenizer.model beside the weights must load and fit the model's vocabulary. big_vision: names,
layouts, vocabulary and config are `pali_jax.weights.big_vision`'s; the preset (default: the one whose
shapes match) decides what the shapes cannot (soft caps, PaliGemma 2 28B's query scale).

A directory DST is written into a temporary sibling and renamed at the end (it exists whole or not
at all), with a manifest that `verify` checks; it may not be empty, the current directory or above
it, the source or a directory holding it; --overwrite replaces only an empty directory or an
earlier conversion (`model_dir`). An OUT.npz is written the same way (`files.atomic_write`): it
may not be anything but a regular file, nor lie inside the directory it is exported from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pali_jax.checkpoint import read_params, stored_dtypes
from pali_jax.cli import OneLineParser, add_quantize_arguments
from pali_jax.files import check_output
from pali_jax.model_dir import (
    CONFIG_FILE, PARAMS_DIR, check_destination, check_tokenizer, read_model_config, read_quantization, verify,
    write_model_dir,
)
from pali_jax.paligemma import abstract_params
from pali_jax.quantize import Quantization, parse
from pali_jax.weights import WeightError, big_vision, hf, to_host
from pali_jax.weights.materialise import quantized_leaves

# Looked for beside SRC.npz when no tokenizer is given: big_vision's name, then transformers'.
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")


# -- Hugging Face -> pali-jax --------------------------------------------------------------------
def convert_hf(src: str | Path, dst: str | Path, dtype: str | None = None, overwrite: bool = False,
               quantize: "str | Quantization | None" = None, group_size: int | None = None) -> Path:
    """Converts the HF checkpoint SRC into a pali-jax directory DST (orbax params, config,
    tokenizer files, manifest); with `quantize` ("int8" / "int4", `pali_jax.quantize`), the weights
    are quantised tensor by tensor as they are read, and DST records it (it loads quantised)."""
    src = Path(src)
    quant = parse(quantize, group_size)
    dst = check_destination(dst, src, overwrite=overwrite)  # before any reading: fail fast
    plan = hf.plan(src, dtype)
    if (src / "tokenizer.model").exists():  # else arrays-only use (generate_ids); text prompts will say it is missing
        check_tokenizer(src / "tokenizer.model", plan.config)
    quantized_leaves(plan, quant)  # a group size that does not fit the model fails before anything is read
    return write_model_dir(dst, plan.config, to_host(plan, quant), src, overwrite=overwrite, quant=quant)


# -- big_vision -> pali-jax ----------------------------------------------------------------------
def convert_big_vision(
    src: str | Path,
    dst: str | Path,
    *,
    preset: str | None = None,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    final_logit_softcap: bool = True,
    overwrite: bool = False,
    quantize: "str | Quantization | None" = None,
    group_size: int | None = None,
) -> Path:
    """Converts a big_vision `.npz` into a pali-jax directory DST; every array of SRC must be used
    and every parameter filled, and arrays are read one at a time (and quantised, with `quantize`,
    as `convert_hf` does)."""
    src = Path(src)
    quant = parse(quantize, group_size)
    dst = check_destination(dst, src, overwrite=overwrite)  # before any reading: fail fast
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise WeightError(f"tokenizer {tokenizer} does not exist")
    if tokenizer is None:
        tokenizer = next((src.parent / n for n in TOKENIZER_NAMES if (src.parent / n).is_file()), None)
    plan = big_vision.plan(src, dtype, preset, final_logit_softcap=final_logit_softcap)
    if tokenizer is not None:  # it must load and fit before anything is read or written
        check_tokenizer(Path(tokenizer), plan.config, "the checkpoint's config")
    extra = {"tokenizer.model": Path(tokenizer)} if tokenizer is not None else None
    quantized_leaves(plan, quant)
    return write_model_dir(dst, plan.config, to_host(plan, quant), None, extra, overwrite=overwrite, quant=quant)


# -- pali-jax -> big_vision ----------------------------------------------------------------------
def export_big_vision(src: str | Path, dst: str | Path, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Writes the model of a pali-jax directory as a big_vision `.npz`: big_vision's names
    (`params/img/...`, `params/llm/...`) and layouts, bfloat16 stored as 2-byte void, and the
    embedding table's first 257152 rows (see `pali_jax.weights.big_vision`)."""
    src, dst = Path(src), Path(dst)
    if not (src / CONFIG_FILE).is_file():
        raise WeightError(f"{src} is not a pali-jax directory (no {CONFIG_FILE})")
    real = check_output(dst, "the output", sources=[src])
    if real.exists() and not overwrite:
        raise WeightError(f"{dst} already exists (pass --overwrite to replace it)")
    config = read_model_config(src)
    if read_quantization(src) is not None:
        raise WeightError(f"{src} is quantized: big_vision checkpoints hold float weights; export its float source")
    params = read_params(src / PARAMS_DIR, stored_dtypes(src / PARAMS_DIR, abstract_params(config)))
    big_vision.save_npz(real, config, params, dtype=dtype)
    return dst


# -- the commands --------------------------------------------------------------------------------
def _parser(prog: str, description: str, src: str, dst: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=description)
    p.add_argument("src", help=src)
    p.add_argument("dst", help=dst)
    return p


def convert_command(argv: list[str], prog: str = "pali-jax convert") -> None:
    """`pali-jax convert SRC DST`: Hugging Face checkpoint -> pali-jax directory."""
    p = _parser(prog, "Hugging Face PaliGemma safetensors -> a pali-jax directory (orbax params + config).",
                "HF PaliGemma checkpoint directory", "output directory (created atomically)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32 or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is an earlier conversion")
    add_quantize_arguments(p)
    args = p.parse_args(argv)
    print(f"wrote {convert_hf(args.src, args.dst, args.dtype, args.overwrite, args.quantize, args.group_size)}")


def big_vision_command(argv: list[str], prog: str = "pali-jax convert-big-vision") -> None:
    """`pali-jax convert-big-vision SRC.npz DST`: big_vision checkpoint -> pali-jax directory."""
    p = _parser(prog, "big_vision PaliGemma .npz -> a pali-jax directory (orbax params, config, tokenizer).",
                "big_vision PaliGemma checkpoint (.npz)", "output directory (created atomically)")
    p.add_argument("--preset", help="e.g. paligemma2-28b-448 (default: the preset whose shapes match)")
    p.add_argument("--tokenizer", help="sentencepiece model copied as DST/tokenizer.model "
                                       f"(default: {' or '.join(TOKENIZER_NAMES)} beside SRC)")
    p.add_argument("--dtype", default="auto", help="auto (the file's), float32 or bfloat16")
    p.add_argument("--no-final-logit-softcap", action="store_true",
                   help="drop Gemma 2's final logit cap (checkpoints fine-tuned by big_vision's configs)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    add_quantize_arguments(p)
    args = p.parse_args(argv)
    out = convert_big_vision(args.src, args.dst, preset=args.preset, tokenizer=args.tokenizer, dtype=args.dtype,
                             final_logit_softcap=not args.no_final_logit_softcap, overwrite=args.overwrite,
                             quantize=args.quantize, group_size=args.group_size)
    print(f"wrote {out}")


def export_command(argv: list[str], prog: str = "pali-jax export-big-vision") -> None:
    """`pali-jax export-big-vision DIR OUT.npz`: pali-jax directory -> big_vision checkpoint."""
    p = _parser(prog, "A pali-jax directory -> big_vision PaliGemma .npz.",
                "pali-jax directory (pali_jax_config.json + params/)", "output .npz (written atomically)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: each parameter's stored dtype")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = p.parse_args(argv)
    print(f"wrote {export_big_vision(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)}")


def verify_command(argv: list[str], prog: str = "pali-jax verify") -> None:
    """`pali-jax verify DIR`: prints `ok: DIR (N files)`, or one line naming the first missing,
    resized, changed or unlisted file (exit 2)."""
    p = OneLineParser(prog=prog, description="Checks a converted directory against its manifest (sizes and sha256).")
    p.add_argument("dir", help="a directory written by a conversion or fine-tuning's export")
    args = p.parse_args(argv)
    print(f"ok: {args.dir} ({verify(args.dir)} files)")
