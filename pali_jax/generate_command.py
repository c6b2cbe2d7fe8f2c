"""`pali-jax generate`: caption, answer, detect or segment a few images from the command line.

    pali-jax generate                                   # bundled demo model + sample image
    pali-jax generate --model google/paligemma2-3b-mix-224 --image cat.jpg --prompt "caption en"
    pali-jax generate --model ./converted --image photos/ --prompt "detect cat ; dog" --json --draw out.png
    pali-jax generate --model ./converted --image cat.jpg --prompt "segment cat" --seg-vae vae-oid.npz \
        --json --draw out.png --masks-dir masks/

(`python run_generate.py ...` in the repository runs the same.) Decoding is greedy unless --sample
(or a sampling knob) is given. Every image is decoded before the model loads, and every drawing
target checked: a bad input stops the run before any output.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import jax
import PIL.Image
from tqdm import tqdm

from pali_jax.cli import OneLineParser, add_generation_arguments, generation_config, warn
from pali_jax.detection import draw_detections
from pali_jax.errors import UserError
from pali_jax.generate import enable_compilation_cache
from pali_jax.pretrained import PaliGemma, Workload
from pali_jax.processor import folder_images, load_image
from pali_jax.results_file import box_record
from pali_jax.segmentation import resolve_vae_path
from pali_jax.sharding import mesh_from_args

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_NOTE = (
    "no --model given: using the bundled demo model, a toy PaliGemma (4.5M parameters) trained from scratch in "
    "minutes on synthetic images of coloured shapes; it knows only that task. Pass --model for a real checkpoint."
)
def parse_args(argv: list[str], prog: str = "pali-jax generate") -> argparse.Namespace:
    p = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local HF checkpoint dir, converted dir, or hub id (default: bundled demo)")
    p.add_argument("--image", nargs="+", help="image files or folders (default: the bundled sample image)")
    p.add_argument("--prompt", default="caption en", help='e.g. "caption en", "answer en what is this?", "detect cat"')
    add_generation_arguments(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    p.add_argument("--draw", metavar="OUT.png", help="draw detected boxes and masks (one file per image if several)")
    p.add_argument("--attention-map", metavar="OUT.png",
                   help="draw each generated word's attention over the image (one file per image if several)")
    p.add_argument("--masks-dir", metavar="DIR", help="write each decoded mask as a PNG (needs --seg-vae)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="warn about unreadable images and answer the others (default: stop before any output)")
    p.add_argument("--stream", action="store_true", help="print text as it is decoded")
    args = p.parse_args(argv)
    if args.stream and (args.json or args.beams > 1):
        p.error("--stream prints plain text from greedy or sampled decoding: drop --json / --beams")
    args.seg_vae = resolve_vae_path(args.seg_vae)
    if args.masks_dir and not args.seg_vae:
        p.error("--masks-dir needs a mask decoder: --seg-vae PATH (or PALI_JAX_SEG_VAE)")
    for flag, target, formats in (("--draw", args.draw, None), ("--attention-map", args.attention_map, (".png",))):
        problem = target and check_draw_target(target, flag, formats)
        if problem:
            p.error(problem)
    if args.attention_map and (args.stream or args.beams > 1):
        p.error("--attention-map records greedy or sampled decoding: drop --stream / --beams")
    if args.attention_map and importlib.util.find_spec("matplotlib") is None:
        p.error("--attention-map draws with matplotlib: pip install 'pali-jax[inspect]'")
    return args


def check_draw_target(out: str, flag: str = "--draw", formats: tuple[str, ...] | None = None) -> str | None:
    """What is wrong with `flag` OUT (a missing folder, an extension not in `formats`; None: what
    PIL writes), checked before any work; None if nothing."""
    out_path = Path(out)
    if not out_path.parent.is_dir():
        return f"{flag} {out}: folder {out_path.parent} does not exist"
    if out_path.is_dir():
        return f"{flag} {out} is a folder: give a file name such as {out_path / 'out.png'}"
    suffix = out_path.suffix.lower() or ".png"
    if suffix not in (formats or PIL.Image.registered_extensions()):
        return f"{flag} {out}: unknown image extension {suffix!r} (use {' or '.join(formats or ('.png', '.jpg'))})"
    return None


def draw_attention(pg, image, result, target: Path) -> bool:
    """Writes each generated word's attention over `image` to `target`; False if the answer has no word."""
    from pali_jax import inspect, plots  # plots needs matplotlib: the `inspect` extra

    pieces = [pg.tokenizer.decode([t]) for t in result.token_ids]
    words, maps = inspect.word_attention_maps(result.attentions, pieces, pg.config.num_image_tokens)
    if not words:
        return False
    plots.save(plots.word_maps(image, words, maps), target)
    return True


def collect_images(paths: list[str]) -> list[Path]:
    images = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images += folder_images(path)
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"image {path} does not exist")
    return images


def draw_paths(out: str, images: list[Path]) -> list[Path]:
    """One drawing per image: OUT itself for one image, else OUT_<image stem>.ext, numbered
    (_2, _3, ...) where two images share a file name, so that no drawing replaces another."""
    out_path = Path(out)
    if len(images) == 1:
        return [out_path]
    seen: dict[str, int] = {}
    paths = []
    for image in images:
        seen[image.stem] = seen.get(image.stem, 0) + 1
        tag = image.stem if seen[image.stem] == 1 else f"{image.stem}_{seen[image.stem]}"
        paths.append(out_path.with_name(f"{out_path.stem}_{tag}{out_path.suffix or '.png'}"))
    return paths


def check_images(images: list[Path], skip_bad: bool) -> list[Path]:
    """Decodes every image once before the model runs, so that a bad one stops the run before any
    output (or, with `skip_bad`, is reported on stderr and left out)."""
    good = []
    for path in images:
        try:
            load_image(path)
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{e} (pass --skip-bad-images to answer the other images)") from None
            warn(f"skipped {e}")
            continue
        good.append(path)
    if not good:
        raise UserError("no readable image left to answer")
    return good


def write_masks(directory: str, image: Path, boxes) -> None:
    """One PNG (0 / 255) per decoded mask: DIR/<image stem>_<k>_<label>.png."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for k, det in enumerate(b for b in boxes if b.mask is not None):
        label = "".join(c if c.isalnum() or c in "-_" else "_" for c in det.label)[:40] or "mask"
        PIL.Image.fromarray(det.mask.astype("uint8") * 255).save(out / f"{image.stem}_{k}_{label}.png")


def run(args: argparse.Namespace) -> None:
    generation = generation_config(args, batch_size=args.batch_size)
    mesh = mesh_from_args(args)  # joins a multi-host run first: before anything touches a device
    if jax.process_index() != 0:  # every process computes; the first one speaks
        sys.stdout = open(os.devnull, "w")
    if not args.no_compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    model_path = args.model
    if model_path is None:
        model_path = DEMO_DIR / "model"
        if not model_path.exists():
            raise UserError(f"the bundled demo model is missing from {model_path}: pass --model")
        print(f"pali-jax: {DEMO_NOTE}", file=sys.stderr)
    images = collect_images(args.image) if args.image else sorted((DEMO_DIR / "images").glob("*.png"))[:1]
    if not images:
        raise UserError("no image given and no bundled sample image found: pass --image")
    images = check_images(images, args.skip_bad_images)
    drawings = iter(draw_paths(args.draw, images) if args.draw else [])  # in the order of `images`
    attention_maps = iter(draw_paths(args.attention_map, images) if args.attention_map else [])
    if args.attention_map:
        generation = generation.replace(output_attentions=True)
    t0 = time.perf_counter()
    # Inference only, so on one device each decoder layer keeps its own weights: faster decoding.
    # The programs compile while the weights are read (--stream answers one image at a time).
    prompts = (args.prompt,) if args.stream else tuple([args.prompt] * len(images))
    workload = Workload(prompts, generation, stream=args.stream)
    pg = PaliGemma.from_pretrained(model_path, dtype=args.dtype, mesh=mesh, mask_decoder=args.seg_vae,
                                    quantize=args.quantize, group_size=args.group_size, compile_for=workload)
    load_s = time.perf_counter() - t0
    if args.stream:
        for path in images:
            if len(images) > 1:
                print(f"{path}: ", end="", flush=True)
            for piece in pg.stream(path, args.prompt, generation_config=generation):
                print(piece, end="", flush=True)
            print()
        return

    batches = [images[i : i + generation.batch_size] for i in range(0, len(images), generation.batch_size)]
    for batch in tqdm(batches, desc="images", unit="batch", disable=len(batches) == 1, file=sys.stderr):
        t1 = time.perf_counter()
        results = pg.generate(batch, args.prompt, generation_config=generation)
        batch_s = time.perf_counter() - t1
        for path, result in zip(batch, results):
            target, map_target = next(drawings, None), next(attention_maps, None)
            image = load_image(path) if target is not None or map_target is not None else None
            if target is not None and result.boxes:
                draw_detections(image, result.boxes).save(target)
            elif target is not None:
                print(f"note: no boxes in the answer for {path}: nothing drawn", file=sys.stderr)
            if map_target is not None and not draw_attention(pg, image, result, map_target):
                print(f"note: the answer for {path} has no word: no attention map drawn", file=sys.stderr)
            if args.masks_dir:
                write_masks(args.masks_dir, path, result.boxes)
            if args.json:
                print(json.dumps({
                    "image": str(path), "prompt": args.prompt, "text": result.text,
                    "token_ids": result.token_ids, "stop_reason": result.stop_reason,
                    "boxes": [box_record(b) for b in result.boxes],
                    "timings": {"load_s": round(load_s, 4), "batch_s": round(batch_s, 4), "batch_size": len(batch)},
                }), flush=True)
            else:
                print(f"{path}: {result.text}" if len(images) > 1 else result.text, flush=True)


def command(argv: list[str], prog: str = "pali-jax generate") -> None:
    """`pali-jax generate ARGS` (see the module docstring)."""
    run(parse_args(argv, prog))
