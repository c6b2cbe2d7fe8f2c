"""Write scenes of the shapes task (shapes.py) as evaluation data: images and one JSONL file per task.

    python -m pali_jax.demo.dataset --out DIR [--scenes 200] [--seed 4]

DIR/images/*.png and, in the fine-tuning format with each task's references (see pali_jax.evaluate):

    caption.jsonl   "caption en"                        suffix + "references"
    vqa.jsonl       "answer en what color is the X?"    suffix + "answers"
    refcoco.jsonl   "detect X" (one box per line)       suffix + "boxes" (pixels); also for --task detection

The demo model was trained on seed 1 (seed 2 held out during training, 3 for the samples): the
default seed 4 gives scenes it never saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import PIL.Image

from pali_jax.demo import shapes

DEFAULT_SEED = 4
MAX_SCENES = 100_000


def write_dataset(out: str | Path, n: int, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Writes `n` scenes from `seed` under `out`; returns the task -> JSONL file written."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"caption": [], "vqa": [], "refcoco": []}
    for i, scene in enumerate(shapes.scenes(n, seed)):
        name = f"images/scene_{i:05d}.png"
        PIL.Image.fromarray(shapes.render(scene)).save(out / name)
        text = shapes.caption(scene)
        lines["caption"].append(json.dumps({"image": name, "prefix": "caption en", "suffix": text,
                                            "references": [text]}))
        for s in scene.shapes:
            lines["vqa"].append(json.dumps({"image": name, "prefix": f"answer en what color is the {s.kind}?",
                                            "suffix": s.color, "answers": [s.color]}))
            y0, x0, y1, x1 = s.box
            lines["refcoco"].append(json.dumps({
                "image": name, "prefix": f"detect {s.kind}", "suffix": f"{shapes.loc_tokens(s.box)} {s.kind}",
                "boxes": [{"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1, "label": s.kind}]}))
    files = {}
    for task, rows in lines.items():
        files[task] = out / f"{task}.jsonl"
        files[task].write_text("\n".join(rows) + "\n")
    return files


def main(argv: list[str] | None = None) -> int:
    from pali_jax.cli import OneLineParser, run_main

    def body() -> None:
        p = OneLineParser(prog="python -m pali_jax.demo.dataset", description=__doc__.split("\n\n")[0])
        p.add_argument("--out", required=True, help="folder to write (images/ and the JSONL files)")
        p.add_argument("--scenes", type=int, default=200)
        p.add_argument("--seed", type=int, default=DEFAULT_SEED)
        args = p.parse_args(argv)
        if not 1 <= args.scenes <= MAX_SCENES:
            p.error(f"--scenes must be in [1, {MAX_SCENES}], got {args.scenes}")
        for task, path in write_dataset(args.out, args.scenes, args.seed).items():
            print(f"{task}: {path}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
