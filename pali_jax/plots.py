"""Pictures of what `inspect.py` measures: heat maps over the image, grids of them per layer and
head, the prefix-LM mask and attention matrices with their token blocks, per-word attention maps,
and the logit lens as a table.

Needs matplotlib (`pip install pali-jax[inspect]`). Figures are built with matplotlib's
object-oriented API (`matplotlib.figure.Figure`), never through pyplot: nothing here selects a
backend, keeps figures alive or shows windows. Every function returns the Figure; `save` writes it.
In a notebook, a Figure left as a cell's last expression is drawn once `%matplotlib inline` has run
(or `IPython.display.display(fig)`); elsewhere, `save` it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import PIL.Image
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pali_jax.errors import UserError
from pali_jax.files import atomic_write
from pali_jax.inspect import LogitLens, Segment, upsample

PANEL_INCHES = 2.2  # one overlay panel of a grid


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Writes `fig` as a PNG at `path` atomically (a temporary file beside it, then a rename): a
    reader never sees half a picture, and a failed write leaves an older file whole."""
    path = Path(path)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=dpi)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _image_array(image) -> np.ndarray:
    """A PIL image or an [H, W, 3] uint8 array as [H, W, 3] uint8."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise UserError(f"image must be a PIL image or an [H, W, 3] uint8 array, got {array.dtype} {list(array.shape)}")
    return array


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def overlay(
    image,
    heat,
    ax: Axes | None = None,
    *,
    alpha: float = 0.5,
    cmap: str = "viridis",
    vmax: float | None = None,
    title: str | None = None,
) -> Figure:
    """`heat` ([g, g] patch map or any [h, w]) drawn over `image` (PIL or [H, W, 3] uint8, the
    ORIGINAL image): upsampled to its pixels as the processor stretched it (`inspect.upsample`),
    scaled 0 .. vmax (None: the map's own maximum). Draws into `ax` when given."""
    pixels = _image_array(image)
    heat = upsample(heat, pixels.shape[0], pixels.shape[1])
    fig, ax = _axes(ax, (4, 4 * pixels.shape[0] / pixels.shape[1]))
    ax.imshow(pixels)
    top = float(np.max(heat)) if vmax is None else vmax
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=top if top > 0 else 1.0, interpolation="nearest")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=9)
    return fig


def _panels(rows: int, columns: int) -> tuple[Figure, np.ndarray]:
    """A figure of rows x columns overlay panels; axes [rows, columns]."""
    fig = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows), layout="constrained")
    return fig, np.asarray(fig.subplots(rows, columns, squeeze=False))


def attention_grid(
    maps,
    image,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    shared_scale: bool = True,
    **overlay_options,
) -> Figure:
    """A layers x heads grid of overlays of maps [L, N, g, g] (`image_attention(..., per_layer=True,
    per_head=True)`), each panel labelled "layer l head n". layers / heads: the numbers to print
    (default 0..L-1, 0..N-1; pass the selection you made). shared_scale: one colour scale for every
    panel, so that panels compare; otherwise each is scaled to its own maximum."""
    maps = np.asarray(maps)
    if maps.ndim != 4:
        raise UserError(f"maps must be [L, N, g, g], got shape {list(maps.shape)}")
    layers = list(range(maps.shape[0])) if layers is None else list(layers)
    heads = list(range(maps.shape[1])) if heads is None else list(heads)
    if (len(layers), len(heads)) != maps.shape[:2]:
        raise UserError(f"{len(layers)} layer and {len(heads)} head labels for maps {list(maps.shape)}")
    vmax = float(maps.max()) if shared_scale else None
    fig, axes = _panels(*maps.shape[:2])
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            overlay(image, maps[i, j], axes[i, j], vmax=vmax, title=f"layer {layer} head {head}", **overlay_options)
    return fig


def word_maps(image, words: Sequence[str], maps, *, columns: int = 6, **overlay_options) -> Figure:
    """One overlay per generated word (maps: [n, g, g] or a list of [g, g]), titled by the word, in
    rows of at most `columns` panels."""
    maps = [np.asarray(m) for m in maps]
    if len(words) != len(maps) or not words:
        raise UserError(f"word_maps needs one map per word, got {len(words)} words and {len(maps)} maps")
    if columns < 1:
        raise UserError(f"columns must be at least 1, got {columns}")
    columns = min(columns, len(words))
    rows = -(-len(words) // columns)
    fig, axes = _panels(rows, columns)
    for k, ax in enumerate(axes.flat):
        if k < len(words):
            overlay(image, maps[k], ax, title=repr(words[k]), **overlay_options)
        else:
            ax.set_axis_off()
    return fig


def _matrix(values: np.ndarray, segments: Sequence[Segment], row_segments: Sequence[Segment] | None,
            ax: Axes | None, title: str, **imshow_options) -> Figure:
    """values [T, S] as an image, the token blocks labelled on both axes and split by lines."""
    if values.ndim != 2:
        raise UserError(f"expected a [T, S] matrix, got shape {list(values.shape)}")
    row_segments = segments if row_segments is None else row_segments
    for axis_segments, size, name in ((segments, values.shape[1], "key"), (row_segments, values.shape[0], "query")):
        if not axis_segments or axis_segments[-1].stop != size:
            raise UserError(f"the {name} segments cover {axis_segments[-1].stop if axis_segments else 0} positions, "
                            f"the matrix has {size}")
    fig, ax = _axes(ax, (6, 6 * values.shape[0] / values.shape[1] + 0.5))
    image = ax.imshow(values, interpolation="nearest", aspect="auto", **imshow_options)
    fig.colorbar(image, ax=ax, shrink=0.8)
    for s in segments[1:]:
        ax.axvline(s.start - 0.5, color="red", linewidth=0.8)
    for s in row_segments[1:]:
        ax.axhline(s.start - 0.5, color="red", linewidth=0.8)
    centres = lambda segs: [(s.start + s.stop - 1) / 2 for s in segs]  # noqa: E731
    ax.set_xticks(centres(segments), [s.name for s in segments], fontsize=8)
    ax.set_yticks(centres(row_segments), [s.name for s in row_segments], fontsize=8, rotation=90, va="center")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    return fig


def mask_image(mask, segments: Sequence[Segment], *, row_segments: Sequence[Segment] | None = None,
               ax: Axes | None = None) -> Figure:
    """The attention mask [T, S] bool (e.g. `inspect.prefix_lm_mask(...)[b]`), white = attended, with
    the image / prefix / suffix blocks (`inspect.token_segments`) labelled. row_segments: the
    queries' blocks when they differ from the keys' (default: the same)."""
    return _matrix(np.asarray(mask, float), segments, row_segments, ax, "attention mask", cmap="gray", vmin=0, vmax=1)


def attention_matrix(attn, segments: Sequence[Segment], *, row_segments: Sequence[Segment] | None = None,
                     ax: Axes | None = None, cmap: str = "viridis", log: bool = False) -> Figure:
    """An attention matrix [T, S] (one layer and head, or a mean), blocks labelled as `mask_image`.
    log: show log10(attention) (clipped at 1e-6), where a few large weights hide the rest."""
    values = np.asarray(attn, np.float64)
    if log:
        values = np.log10(np.maximum(values, 1e-6))
    return _matrix(values, segments, row_segments, ax, "log10 attention" if log else "attention", cmap=cmap)


def logit_lens_table(
    lens: LogitLens,
    decode: Callable[[int], str],
    *,
    row: int = 0,
    positions: Sequence[int] | None = None,
    position_labels: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The logit lens of one batch row as a layers x positions heat map of the top-1 probability,
    each cell labelled with its top-1 token's text. Rows bottom-up: the embeddings ("embed"), then
    the output of layers 1 .. L (counted from 1: row l is after l layers). decode: token id -> text (`tokenizer.decode`
    of one id, or a list of strings' `__getitem__`). positions: which (default all; a real prompt
    has hundreds, pick e.g. the suffix). position_labels: x tick labels (default the positions)."""
    n_layers, batch, length = lens.top_ids.shape[:3]
    if not 0 <= row < batch:
        raise UserError(f"row {row} out of range for a batch of {batch}")
    positions = list(range(length)) if positions is None else [int(p) for p in positions]
    if not positions or min(positions) < 0 or max(positions) >= length:
        raise UserError(f"positions must be a non-empty selection of 0..{length - 1}, got {positions}")
    labels = [str(p) for p in positions] if position_labels is None else list(position_labels)
    if len(labels) != len(positions):
        raise UserError(f"{len(labels)} position labels for {len(positions)} positions")
    probs = lens.top_probs[:, row, positions, 0]  # [L+1, P]
    ids = lens.top_ids[:, row, positions, 0]
    fig, ax = _axes(ax, (1.0 + 0.9 * len(positions), 1.0 + 0.4 * n_layers))
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, shrink=0.8, label="top-1 probability")
    for (layer, p), token in np.ndenumerate(ids):
        colour = "white" if probs[layer, p] > 0.6 else "black"
        ax.text(p, layer, decode(int(token)), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(positions)), labels, fontsize=8)
    ax.set_yticks(range(n_layers), ["embed"] + [str(layer) for layer in range(1, n_layers)], fontsize=8)
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    return fig
