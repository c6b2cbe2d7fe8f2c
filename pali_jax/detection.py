"""Parse PaliGemma detection / segmentation output and draw it.

PaliGemma answers ``detect cat ; dog`` with ``<locY0><locX0><locY1><locX1> label`` entries joined by
``" ; "``. Coordinates are bins 0..1023 of the (square) model input, so they scale to any image size
as ``y = bin / 1024 * height`` and ``x = bin / 1024 * width``. ``segment`` answers add 16
``<segNNN>`` codes after the four locations, returned as plain integers; `Detection.mask` holds
the decoded mask when a mask decoder is given (`pali_jax.segmentation`, `PaliGemma.generate(...,
mask_decoder=...)`).
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from pali_jax.errors import UserError
from pali_jax.processor import check_image_size

_LOC = r"<loc(\d{4})>"
# A box, then any <segNNN> codes, then the label up to the next ";" or "<" (start of the next box).
_DETECTION_RE = re.compile(_LOC * 4 + r"(?P<seg>(?:<seg\d{3}>)*)(?P<label>[^;<]*)")
_SEG_RE = re.compile(r"<seg(\d{3})>")
_NUM_SEG_CODES = 16
# Mask overlay colours, one per detection in turn, and how much of the image shows through.
_MASK_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
_MASK_ALPHA = 0.5


@dataclass(frozen=True)
class Detection:
    """One box in pixels of the original image, with its label and, for segmentation, 16 codes.

    `locs` are the four `<loc>` bins as generated (y1, x1, y2, x2); `mask` is the decoded mask,
    bool [H, W] of the original image, when a mask decoder was given (else None).
    """

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    label: str
    seg_codes: tuple[int, ...] | None = None
    locs: tuple[int, int, int, int] | None = field(default=None, compare=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


def parse_detections(text: str, image_width: int, image_height: int) -> list[Detection]:
    """Boxes found in a PaliGemma answer, scaled to an image of the given size.

    Anything that is not a complete run of four ``<locNNNN>`` tokens is skipped, as are boxes with
    a bin above 1023. A missing label gives ``""``. ``seg_codes`` is set only when exactly 16
    ``<segNNN>`` tokens (each below 128) follow the box. Swapped corners are put in order.
    """
    if not isinstance(text, str):
        raise UserError(f"text must be a string (a PaliGemma answer), got {type(text).__name__}")
    check_image_size(image_width, image_height)
    detections = []
    for match in _DETECTION_RE.finditer(text):
        y0, x0, y1, x1 = (int(match.group(i)) for i in range(1, 5))
        if max(y0, x0, y1, x1) > 1023:
            continue
        codes = tuple(int(c) for c in _SEG_RE.findall(match.group("seg")))
        valid_codes = len(codes) == _NUM_SEG_CODES and max(codes) < 128
        xs = sorted((x0 / 1024 * image_width, x1 / 1024 * image_width))
        ys = sorted((y0 / 1024 * image_height, y1 / 1024 * image_height))
        detections.append(
            Detection(
                xmin=xs[0],
                ymin=ys[0],
                xmax=xs[1],
                ymax=ys[1],
                label=match.group("label").strip(),
                seg_codes=codes if valid_codes else None,
                locs=(y0, x0, y1, x1),
            )
        )
    return detections


def draw_detections(
    image: PIL.Image.Image | np.ndarray,
    detections: Iterable[Detection],
    color: str | tuple[int, int, int] = "red",
    line_width: int = 2,
) -> PIL.Image.Image:
    """A copy of ``image`` (PIL, or uint8 ``[H, W, 3]`` array) with boxes and labels drawn on it.

    Detections with a ``mask`` (of the image's size) get it overlaid in a translucent colour of
    their own, their box and label drawn in that colour."""
    if not isinstance(image, (PIL.Image.Image, np.ndarray)):
        raise UserError(f"image must be a PIL image or a uint8 [H, W, 3] array, got {type(image).__name__}")
    if isinstance(detections, Detection) or not isinstance(detections, Iterable):
        raise UserError(f"detections must be a list of Detection, got {type(detections).__name__}")
    detections = list(detections)
    for i, det in enumerate(detections):
        if not isinstance(det, Detection):
            raise UserError(f"detections[{i}] must be a Detection, got {type(det).__name__}")
    canvas = (PIL.Image.fromarray(image) if isinstance(image, np.ndarray) else image).convert("RGB")
    colors = []
    pixels = None
    for k, det in enumerate(detections):
        colors.append(color)
        if det.mask is not None and det.mask.shape == (canvas.height, canvas.width):
            colors[-1] = _MASK_COLORS[k % len(_MASK_COLORS)]
            pixels = np.asarray(canvas, np.float32) if pixels is None else pixels
            pixels[det.mask] = (1 - _MASK_ALPHA) * pixels[det.mask] + _MASK_ALPHA * np.float32(colors[-1])
    if pixels is not None:
        canvas = PIL.Image.fromarray(pixels.round().astype(np.uint8))
    draw = PIL.ImageDraw.Draw(canvas)
    font = PIL.ImageFont.load_default()
    for det, color in zip(detections, colors):
        draw.rectangle((det.xmin, det.ymin, det.xmax, det.ymax), outline=color, width=line_width)
        if det.label:
            left, top, right, bottom = draw.textbbox((0, 0), det.label, font=font)
            # Label on a filled tab above the box, or inside it when the box touches the top edge.
            y = det.ymin - (bottom - top) - 2 if det.ymin >= bottom - top + 2 else det.ymin
            draw.rectangle((det.xmin, y, det.xmin + right - left + 2, y + bottom - top + 2), fill=color)
            draw.text((det.xmin + 1 - left, y + 1 - top), det.label, fill="white", font=font)
    return canvas
