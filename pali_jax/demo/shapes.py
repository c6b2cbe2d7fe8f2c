"""A synthetic vision-language task: one or two coloured shapes on a noisy background.

Each image yields PaliGemma-style examples (prompt -> answer):

    caption en                          -> a red circle and a blue square    (kinds in a fixed order)
    answer en what color is the circle? -> red
    detect circle                       -> <loc0256><loc0512><loc0512><loc0768> circle

Two shapes in one image are always of different kinds, in different columns and not touching, so
every question has one answer. Each shape fills one cell of a 4 x 4
grid, the demo model's 16-pixel SigLIP patches: one image token then holds one whole shape, its
colour and kind together, which a model trained from scratch for minutes on a CPU can learn to read
(shapes at arbitrary pixels, spread over several patches, needed far more steps than that budget to
bind colours to kinds). Boxes are written in PaliGemma's 1024 bins (`bin = pixel * 1024 / size`).
Everything is a pure function of a seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import PIL.ImageDraw

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (255, 140, 0),
}
SHAPES = ("circle", "square", "triangle")
# Drawn at this multiple of the image size, then downsampled: smooth edges, sub-pixel-free boxes.
_SUPERSAMPLE = 4
_CELL = 16  # shape side, and the grid their boxes sit on, in pixels
_GAP = 2  # pixels between two shapes' boxes: never in touching cells
_MIN_DX = 4  # pixels between two shapes' centres along x: never in one column


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # ymin, xmin, ymax, xmax in pixels (max exclusive)

    @property
    def center_x(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def cell(self) -> int:
        """Row-major index of the grid cell (the demo model's image patch) the shape fills."""
        return (self.box[0] // _CELL) * (IMAGE_SIZE // _CELL) + self.box[1] // _CELL


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # left to right
    background: int  # grey level
    noise_seed: int


def random_scene(rng: np.random.Generator, num_shapes: int | None = None) -> Scene:
    """One or two shapes (of different kinds) in random cells, apart."""
    n = int(rng.integers(1, 3)) if num_shapes is None else num_shapes
    kinds = rng.choice(len(SHAPES), n, replace=False)
    colors = list(COLORS)
    while True:  # rejection sampling: a couple of tries on average
        shapes = []
        for k in kinds:
            y, x = (_CELL * int(v) for v in rng.integers(0, IMAGE_SIZE // _CELL, 2))
            shapes.append(Shape(SHAPES[k], colors[rng.integers(len(colors))], (y, x, y + _CELL, x + _CELL)))
        if n == 1 or _apart(*shapes):
            break
    shapes.sort(key=lambda s: s.center_x)
    return Scene(tuple(shapes), int(rng.integers(20, 110)), int(rng.integers(2**31)))


def _apart(a: Shape, b: Shape) -> bool:
    ay0, ax0, ay1, ax1 = a.box
    by0, bx0, by1, bx1 = b.box
    separated = ax1 + _GAP <= bx0 or bx1 + _GAP <= ax0 or ay1 + _GAP <= by0 or by1 + _GAP <= ay0
    return separated and abs(a.center_x - b.center_x) >= _MIN_DX


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 [64, 64, 3] image."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    canvas = PIL.Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = PIL.ImageDraw.Draw(canvas)
    for s in scene.shapes:
        y0, x0, y1, x1 = (v * _SUPERSAMPLE for v in s.box)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon(((x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)), fill=fill)
    image = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.BOX), np.float32)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 6.0, image.shape)
    return np.clip(image + noise, 0, 255).round().astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """`a red circle` or `a red circle and an orange square`: shapes in the order of `SHAPES`.

    A fixed order of kinds, not left to right: the demo model, trained for minutes, learnt which
    colour goes with which kind (100% of answers) long before it learnt to compare two shapes'
    places (captions left to right: 84.5% exact after 7000 steps; 30 of the 31 misses reversed).
    """
    ordered = sorted(scene.shapes, key=lambda s: SHAPES.index(s.kind))
    return " and ".join(f"{_article(s.color)} {s.color} {s.kind}" for s in ordered)


def loc_tokens(box: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> str:
    """A pixel box as PaliGemma's `<locY0><locX0><locY1><locX1>` (bins of 1/1024 of the image)."""
    return "".join(f"<loc{min(1023, round(v * 1024 / size)):04d}>" for v in box)


def prompts(scene: Scene) -> list[tuple[str, str]]:
    """Every (prefix, suffix) pair the scene answers: a caption, then a question and a detection per shape."""
    pairs = [("caption en", caption(scene))]
    for s in scene.shapes:
        pairs.append((f"answer en what color is the {s.kind}?", s.color))
        pairs.append((f"detect {s.kind}", f"{loc_tokens(s.box)} {s.kind}"))
    return pairs


def count_prompt(scene: Scene) -> tuple[str, str]:
    """A task the demo model was not trained on (the notebook fine-tunes it): how many shapes."""
    return "answer en how many shapes are there?", ("one", "two")[len(scene.shapes) - 1]


def scenes(n: int, seed: int) -> list[Scene]:
    """`n` random scenes from `seed`."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def tokenizer_corpus() -> list[str]:
    """Every word of the task (and of `count_prompt`) in context, for training the tokenizer."""
    lines = []
    for color in COLORS:
        for kind in SHAPES:
            lines += [f"{_article(color)} {color} {kind}", f"answer en what color is the {kind}?", f"detect {kind}",
                      f"{_article(color)} {color} {kind} and a {kind}", color, kind]
    lines += ["caption en", "answer en how many shapes are there?", "one", "two"]
    return lines
