"""Does the demo model's attention at the word "circle" point at the circle? Measured, three ways.

    python -m benchmarks.circle_attention              # 50 held-out images (about a minute on 2 CPU cores)
    python -m benchmarks.circle_attention --images 200 --seed 11

For held-out scenes with a circle (seed != the training seed 1), the demo model captions each image
(`pg.generate(..., output_attentions=True)`); at the pass that produces "circle" it reads the
attention over the 16 image tokens and counts how often its largest entry is the circle's own cell
of the 4 x 4 patch grid (chance: 1 / 16). Maps:
  mean       every layer and head averaged (`inspect.word_attention_maps`, `run_generate.py --attention-map`);
  best head  the single (layer, head) with the most hits, chosen on these same images (optimistic);
  through SigLIP  that mean map carried back from image tokens to patches through SigLIP's attention
             rollout (`map @ attention_rollout(vision_attentions)`), from a teacher-forced forward;
  colour lookup  the pass before: the one that writes the circle's colour ("a" -> "red"), layer 0
             alone, each head's row rescaled to its share of image attention (`normalize=True`).
             Chosen among 64 such variants on seeds 3, 10, 11 and 12: measure it on other seeds.
"""

from __future__ import annotations

import argparse

import numpy as np
import PIL.Image

from benchmarks import report
from pali_jax import inspect
from pali_jax.demo import shapes
from pali_jax.demo.train_demo import TRAIN_SEED
from pali_jax.pretrained import PaliGemma
from pali_jax.processor import preprocess_images

DEMO_MODEL = "pali_jax/assets/demo/model"
HELDOUT_SEED_FOR_MAPS = 10  # scenes never trained on (the training seed is TRAIN_SEED)


def circle_cell(scene: shapes.Scene) -> int:
    """The grid cell (row-major) holding the scene's circle."""
    return next(s for s in scene.shapes if s.kind == "circle").cell


def measure(images: int, seed: int) -> dict[str, float]:
    if seed == TRAIN_SEED:
        raise SystemExit(f"error: seed {seed} made the training images: pick another")
    pg = PaliGemma.from_pretrained(DEMO_MODEL)
    p = pg.config.num_image_tokens
    scenes = [s for s in shapes.scenes(images * 4, seed) if any(x.kind == "circle" for x in s.shapes)][:images]
    pictures = [PIL.Image.fromarray(shapes.render(s)) for s in scenes]
    results = pg.generate(pictures, "caption en", output_attentions=True)
    prompt = pg.tokenizer(["caption en"], num_image_tokens=p)
    hits = {"mean": 0, "through SigLIP": 0, "colour lookup (layer 0, normalised)": 0}
    per_head = np.zeros((pg.config.text.depth, pg.config.text.num_heads))
    counted = 0
    for scene, picture, result in zip(scenes, pictures, results):
        pieces = [pg.tokenizer.decode([t]) for t in result.token_ids]
        words, maps = inspect.word_attention_maps(result.attentions, pieces, p)
        if "circle" not in words:
            continue  # the demo answers right on held-out images; a miss would show in `counted`
        k = words.index("circle")
        spans = [span for _, span in inspect.answer_words(pieces)]
        span, colour = spans[k], spans[k - 1]  # the caption reads "a <colour> circle"
        cell = circle_cell(scene)
        counted += 1
        hits["mean"] += int(maps[k].argmax() == cell)
        lookup = inspect.image_attention(result.attentions[colour].transpose(1, 2, 0, 3), 0, p, layers=0,
                                         normalize=True)
        hits["colour lookup (layer 0, normalised)"] += int(lookup.argmax() == cell)
        heads = inspect.image_attention(result.attentions[span].transpose(1, 2, 0, 3), 0, p, per_layer=True,
                                        per_head=True)  # [L, N, g, g]
        per_head += heads.reshape(*heads.shape[:2], -1).argmax(-1) == cell
        ids = np.concatenate([prompt.input_ids, [result.token_ids]], axis=1)
        types = np.concatenate([prompt.token_type_ids, np.ones((1, len(result.token_ids)), np.int32)], axis=1)
        out = pg.forward(preprocess_images([picture], pg.config.image_size), ids, types, output_attentions=True)
        rollout = inspect.attention_rollout([np.asarray(a)[0] for a in out.vision_attentions])  # [P, P]
        hits["through SigLIP"] += int((maps[k].reshape(-1) @ rollout).argmax() == cell)
    layer, head = np.unravel_index(per_head.argmax(), per_head.shape)
    rates = {name: n / counted for name, n in hits.items()}
    rates[f"best head (layer {layer}, head {head})"] = per_head.max() / counted
    rates["images"] = counted
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED_FOR_MAPS, help="scene seed (1 is the training seed)")
    report.add_arguments(parser)
    args = parser.parse_args()
    rates = measure(args.images, args.seed)
    images = rates.pop("images")
    for name, rate in rates.items():
        print(f"{name}: the map peaks in the circle's cell for {rate:.0%} of {images} images (chance 6%)")
    report.write(args, "circle_attention", ["map", "peaks in the circle's cell"],
                 [(name, f"{rate:.0%}") for name, rate in rates.items()],
                 note=f"{images} held-out scenes with a circle (seed {args.seed}); chance is 1 in 16.")


if __name__ == "__main__":
    main()
