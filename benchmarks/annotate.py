"""The dataset job (`pali_jax.annotate`, continuous batching) against today's fixed batches, side by side.

    python -m benchmarks.annotate demo --images 2000            # the bundled demo model, mixed prompts
    python -m benchmarks.annotate wide --images 256             # PaliGemma 1 3B widths, 2 + 2 layers, random

demo: images of `pali_jax/demo/shapes.py` with mixed prompts (captions, colour questions,
detection: answers of 1 to 12 tokens), max_new_tokens 32. The fixed-batch side is what
`run_generate.py --image DIR --batch-size 32` does (every image decoded once up front by
`check_images`, then `pg.generate` per batch of 32, which decodes them again on the device thread),
given each image's own prompt. The job's side is `annotate(pg, items, slots=32)`. Both are warmed
up first on the same items (compilation excluded; its time is printed); the job's answers are
compared with one-by-one `pg.generate` per image (all of them with --check-all, else the first 200).

wide: random weights of PaliGemma 1 3B's widths (SigLIP So400m and Gemma 2B widths, full
vocabulary) at 2 + 2 layers, as `benchmarks.generation` builds them; prompts "caption en", half
the images with max_new_tokens 8 and half with 64 (random weights never emit EOS, so every answer
runs to its limit), in random order. Fixed batches of --slots rows decode to their longest answer.
Device idle time comes from the job's counters (`input_wait_s`: every slot empty, waiting for an
image) with the slot occupancy (live rows / rows, over decode steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from benchmarks import report
from pali_jax.annotate import Item, JobStats, annotate
from pali_jax.pretrained import PaliGemma

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"


def demo_items(folder: Path, n: int, seed: int = 11) -> list[Item]:
    """n shapes images written to `folder`, each with one of its prompts (caption, colour, detection) in turn."""
    from pali_jax.demo import shapes

    items = []
    for i, scene in enumerate(shapes.scenes(n, seed)):
        path = folder / f"{i:05d}.png"
        PIL.Image.fromarray(shapes.render(scene)).save(path)
        prompts = [p for p, _ in shapes.prompts(scene)]
        items.append(Item(str(path), prompts[i % len(prompts)]))
    return items


def fixed_batches(pg: PaliGemma, items: list[Item], batch_size: int, default_tokens: int) -> list[list[int]]:
    """run_generate.py's loop: check every image, then one pg.generate per batch; token ids per item."""
    from pali_jax.generate_command import check_images

    paths = check_images([Path(i.image) for i in items], skip_bad=False)
    out = []
    for start in range(0, len(paths), batch_size):
        part = items[start : start + batch_size]
        limit = max(i.max_new_tokens or default_tokens for i in part)  # a batch decodes to its longest answer
        results = pg.generate(paths[start : start + batch_size], [i.prompt for i in part], max_new_tokens=limit)
        out += [r.token_ids[: i.max_new_tokens or default_tokens] for r, i in zip(results, part)]
    return out


def job(pg: PaliGemma, items: list[Item], slots: int, default_tokens: int) -> tuple[list[list[int]], JobStats]:
    stats = JobStats()
    records = list(annotate(pg, items, slots=slots, max_new_tokens=default_tokens, stats=stats))
    return [r["token_ids"] for r in records], stats


def side_by_side(pg: PaliGemma, items: list[Item], slots: int, default_tokens: int, warm: list[Item]) -> dict:
    t0 = time.perf_counter()
    fixed_batches(pg, warm, slots, default_tokens)
    warm_fixed = time.perf_counter() - t0
    t0 = time.perf_counter()
    job(pg, warm, slots, default_tokens)
    warm_job = time.perf_counter() - t0
    t0 = time.perf_counter()
    fixed = fixed_batches(pg, items, slots, default_tokens)
    fixed_s = time.perf_counter() - t0
    traces = pg.continuous.traces
    t0 = time.perf_counter()
    ours, stats = job(pg, items, slots, default_tokens)
    job_s = time.perf_counter() - t0
    c = stats.decoder
    return {
        "images": len(items), "slots": slots,
        "fixed_images_per_s": round(len(items) / fixed_s, 2), "job_images_per_s": round(len(items) / job_s, 2),
        "ratio": round(fixed_s / job_s, 3), "fixed_s": round(fixed_s, 2), "job_s": round(job_s, 2),
        "warmup_s": {"fixed": round(warm_fixed, 1), "job": round(warm_job, 1)},
        "job_counters": {
            "input_wait_s": round(c.input_wait_s, 3), "device_s": round(c.device_s, 2), "refills": c.refills,
            "decode_calls": c.decode_calls, "decode_steps": c.decode_steps,
            "occupancy": round(c.slot_steps_used / max(1, c.decode_steps * slots), 3),
        },
        "same_tokens_as_fixed_batches": sum(a == b for a, b in zip(fixed, ours)),
        "job_compiles_while_timed": pg.continuous.traces - traces,
    }, ours


def run_demo(args) -> dict:
    pg = PaliGemma.from_pretrained(DEMO_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        items = demo_items(Path(tmp), args.images)
        # Both batch shapes of the fixed side: whole batches, then the last one's size.
        warm = items[: args.warmup - args.warmup % args.slots] + items[: len(items) % args.slots]
        report, ours = side_by_side(pg, items, args.slots, 32, warm)
        checked = items if args.check_all else items[:200]
        t0 = time.perf_counter()
        alone = [pg.generate(i.image, i.prompt, max_new_tokens=32)[0].token_ids for i in checked]
        report["one_by_one_images_per_s"] = round(len(checked) / (time.perf_counter() - t0), 2)
        report["identical_to_one_by_one"] = f"{sum(a == b for a, b in zip(alone, ours))} of {len(checked)}"
    return report


def wide_model(vision_layers: int = 2, text_layers: int = 2) -> PaliGemma:
    """Random weights of PaliGemma 1 3B's widths at reduced depth, in the inference layout, with the
    demo model's tokenizer (its ids lie inside the full vocabulary)."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from pali_jax import backend
    from pali_jax.config import preset
    from pali_jax.paligemma import PaliGemmaModel

    big = preset("paligemma-3b-224")
    cfg = dataclasses.replace(big, vision=dataclasses.replace(big.vision, depth=vision_layers),
                              text=dataclasses.replace(big.text, depth=text_layers))
    layout = backend.Policy.host().inference_layout(jnp.float32)
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    init = jax.jit(PaliGemmaModel(cfg, layout=layout).init)
    params = nn.meta.unbox(init(jax.random.PRNGKey(0), pixels, jnp.zeros((1, 1), jnp.int32))["params"])
    return PaliGemma(cfg, params, jnp.float32, DEMO_MODEL, layout=layout)


def wide_items(n: int, folder: str) -> list[Item]:
    """`n` random 224 px images written into `folder`, captioned with max_new_tokens 8 and 64 mixed."""
    rng = np.random.default_rng(5)
    items = []
    for i, limit in enumerate(rng.permutation([8, 64] * (n // 2))):
        path = Path(folder) / f"{i:05d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path)
        items.append(Item(str(path), "caption en", int(limit)))
    return items


def run_wide(args) -> dict:
    pg = wide_model()
    with tempfile.TemporaryDirectory() as tmp:
        items = wide_items(args.images, tmp)
        # The warm-up compiles the job's programs for the sizes of its first refills (a refill size
        # first met later compiles inside the timed run) and both fixed-batch programs.
        warm = [Item(i.image, i.prompt, 64 if k == 0 else 2) for k, i in enumerate(items[: args.slots + 1])]
        if args.warm_all:  # the whole run once first: the timed job meets no refill size it has not compiled
            warm = items
        report, _ = side_by_side(pg, items, args.slots, 64, warm)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=("demo", "wide"))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--check-all", action="store_true")
    p.add_argument("--warm-all", action="store_true",
                   help="wide: warm up on the whole set (steady state: a long job compiles each refill size once)")
    report.add_arguments(p)
    args = p.parse_args(argv)
    result = run_demo(args) if args.which == "demo" else run_wide(args)
    print(json.dumps(result, indent=1))
    report.write(args, f"annotate_{args.which}", ["figure", "value"], report.flatten(result),
                 note="fixed_*: run_generate.py's fixed batches; job_*: pali_jax.annotate; ratio: fixed_s / job_s; "
                      "occupancy: live rows / rows over decode steps.")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
