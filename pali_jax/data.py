"""Fine-tuning data: JSONL files of examples, and fixed-shape batches.

One example per line, the format of Google's PaliGemma fine-tuning colab:

    {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}

Segmentation lines may give a mask instead of the suffix (an image file of the image's size,
nonzero = inside; optionally its "box" [xmin, ymin, xmax, ymax] in pixels, default the mask's tight
box; optionally a "label", default what follows "segment " in the prefix):

    {"image": "images/0001.jpg", "prefix": "segment cat", "mask": "masks/0001_cat.png"}

and the suffix becomes `<locY1><locX1><locY2><locX2>` + 16 `<segNNN>` + " label", encoded by
big_vision's mask VQ-VAE (`pali_jax.segmentation.MaskDecoder.mask_suffix`, passed as `masks`).

Relative image paths are resolved against the JSONL file's directory. A bad line (not JSON, a
missing or non-string field, an image file that is missing or unreadable, too many tokens) stops
loading with `file:line: what is wrong`, or is reported on stderr and skipped when asked.

Batches have a fixed shape (`batch_size` rows, `max_length` tokens, right-padded), so a run
compiles one train step. The training order is a pure function of the run's PRNG key and the
step number: resuming at step s yields exactly the batches s, s+1, ... of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np

from pali_jax.errors import UserError
from pali_jax.processor import ImageInput, PaliGemmaProcessor, ProcessorError, check_text, load_image

if TYPE_CHECKING:
    from pali_jax.segmentation import MaskDecoder

FIELDS = ("image", "prefix", "suffix")


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: tuple[int, ...], epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([*seed, epoch]).permutation(n)


class DataError(UserError):
    """A data file or example that cannot be used (the message says where and why)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: an image (path, PIL image or uint8 array), prompt and target text."""

    image: ImageInput
    prefix: str
    suffix: str
    source: str = ""  # where it came from, for messages ("train.jsonl:12")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def outside_path(kind: str, value: str) -> str | None:
    """What is wrong with a data file's `kind` path ("image", "mask") that leaves the file's
    directory (absolute, or through ..), None if it stays inside: a data file from elsewhere must
    not make a job read arbitrary files."""
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts:
        return f"{kind} path {value!r} leaves the directory of the data file (pass --allow-outside-paths to allow it)"
    return None


def json_lines(path: str | os.PathLike) -> list[tuple[str, object]]:
    """("file:line", value) of each non-blank line of a JSONL file; an unreadable file or a line
    that is not JSON raises a `UserError` naming it (the caller checks the values' shape)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    values = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                values.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
    return values


def _parse_line(line: str, base: Path, masks: "MaskDecoder | None" = None, allow_outside: bool = False) -> Example | str:
    """The example of one JSONL line, or what is wrong with it. The image is decoded once here, so
    that a truncated or oversized file is reported with its line number before training starts."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return f"expected a JSON object with {', '.join(FIELDS)}, got {type(record).__name__}"
    fields = FIELDS if "mask" not in record else ("image", "prefix", "mask")
    if "mask" in record and "suffix" in record:
        return "give either a suffix or a mask, not both"
    missing = [f for f in fields if f not in record]
    if missing:
        return f"missing field {missing[0]!r}"
    wrong = [f for f in fields if not isinstance(record[f], str)]
    if wrong:
        return f"field {wrong[0]!r} must be a string, got {type(record[wrong[0]]).__name__}"
    if "suffix" in record and not record["suffix"].strip():
        return "field 'suffix' is empty: nothing to learn from"
    for field in (f for f in ("prefix", "suffix") if f in record):
        try:
            check_text(record[field], field)
        except ProcessorError as e:
            return str(e)
    image = base / record["image"]
    if not allow_outside and (outside := outside_path("image", record["image"])):
        return outside
    try:
        size = load_image(image).size
    except ProcessorError as e:
        return str(e)
    if "mask" in record:
        if not allow_outside and (outside := outside_path("mask", record["mask"])):
            return outside
        suffix = _mask_suffix(record, base, size, masks)
        if suffix.startswith("!"):
            return suffix[1:]
        return Example(str(image), record["prefix"], suffix)
    return Example(str(image), record["prefix"], record["suffix"])


def _mask_suffix(record: dict, base: Path, size: tuple[int, int], masks: "MaskDecoder | None") -> str:
    """The `<loc>` + `<seg>` suffix of a line with a mask, or "!" + what is wrong with it."""
    from pali_jax.segmentation import load_mask

    if masks is None:
        return "!the line gives a mask: masks need big_vision's VQ-VAE to encode them (--seg-vae vae-oid.npz)"
    box = record.get("box")
    if box is not None and not (isinstance(box, list) and len(box) == 4
                                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        return "!field 'box' must be [xmin, ymin, xmax, ymax] in pixels of the image"
    label = record.get("label")
    if label is None:
        prefix = record["prefix"].strip()
        label = prefix[len("segment "):].strip() if prefix.startswith("segment ") else ""
    if not isinstance(label, str):
        return f"!field 'label' must be a string, got {type(label).__name__}"
    try:
        mask = load_mask(base / record["mask"])
        if (mask.shape[1], mask.shape[0]) != size:
            return f"!mask {base / record['mask']} is {mask.shape[1]}x{mask.shape[0]}, the image {size[0]}x{size[1]}"
        return masks.mask_suffix(mask, box, label)
    except UserError as e:
        return f"!{e}"


def read_jsonl(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    warn: Callable[[str], None] = _warn,
    masks: "MaskDecoder | None" = None,
    allow_outside: bool = False,
) -> list[Example]:
    """Examples of a JSONL file. Blank lines are ignored. A bad line raises `DataError`
    ("file:line: problem"), or with `skip_bad` is passed to `warn` and skipped. `masks` (the
    segmentation VQ-VAE) turns lines with a "mask" into `<loc>` + `<seg>` suffixes. Image and mask
    paths must stay inside the file's directory (no `..`, not absolute) unless `allow_outside`: a
    data file from elsewhere must not make training read arbitrary files."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parsed = _parse_line(line, path.parent, masks, allow_outside)
        if isinstance(parsed, str):
            message = f"{path}:{number}: {parsed}"
            if not skip_bad:
                raise DataError(message)
            warn(f"skipped {message}")
            continue
        examples.append(dataclasses.replace(parsed, source=f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path} holds no usable example")
    return examples


class Dataset:
    """Examples tokenized for one model, batched to a fixed shape.

    max_length: tokens per row (image tokens included); None takes the longest example, at most
    the model's positions (`limit`, when given). An example longer than that raises `DataError`
    naming its line, or is skipped with `skip_bad`.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        processor: PaliGemmaProcessor,
        max_length: int | None = None,
        *,
        skip_bad: bool = False,
        warn: Callable[[str], None] = _warn,
        limit: int | None = None,
    ):
        tok, n_image = processor.tokenizer, processor.num_image_tokens
        lengths = [len(tok.encode_example(e.prefix, e.suffix, num_image_tokens=n_image)[0]) for e in examples]
        if limit is not None and max_length is not None and max_length > limit:
            raise DataError(f"max_length {max_length} exceeds the model's {limit} positions (max_position_embeddings)")
        # What a row may hold: the explicit max_length, else the model's positions (else anything).
        bound, bound_name = (max_length, "max_length") if max_length is not None else (limit, "the model's positions")
        kept, kept_lengths = [], []
        for example, length in zip(examples, lengths):
            if bound is not None and length > bound:
                message = (f"{example.source or 'example'}: {length} tokens ({n_image} image tokens) "
                           f"exceed {bound_name} {bound}")
                if not skip_bad:
                    raise DataError(message)
                warn(f"skipped {message}")
                continue
            kept.append(example)
            kept_lengths.append(length)
        if not kept:
            raise DataError("no usable example")
        if max_length is None:
            max_length = max(kept_lengths)
        self.examples = kept
        self.processor = processor
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int], *, rows: int | None = None) -> dict[str, np.ndarray]:
        """The examples at `indices` as model inputs (`PaliGemmaProcessor` fields + `loss_mask`),
        right-padded to `max_length`; `rows` > len(indices) appends empty rows (no loss)."""
        if not len(indices):  # e.g. a process's share of the last, padded eval batch
            return {k: np.zeros((rows or 0, *v.shape[1:]), v.dtype) for k, v in self.batch([0]).items()}
        chosen = [self.examples[i] for i in indices]
        batch = self.processor(
            [e.image for e in chosen], [e.prefix for e in chosen], [e.suffix for e in chosen],
            padding_side="right", max_length=self.max_length, pad_to_max_length=True,
        )
        extra = (rows or len(chosen)) - len(chosen)
        if extra > 0:
            batch = {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        return batch

    def train_indices(self, step: int, batch_size: int, key: jax.Array) -> np.ndarray:
        """Which examples form training batch `step`: epochs of permutations seeded by the raw
        PRNG key `key` and the epoch number, read in order."""
        n = len(self.examples)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        seed = tuple(int(w) for w in np.asarray(key, np.uint32).ravel())
        epochs = positions // n
        out = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            out[epochs == epoch] = _epoch_order(seed, int(epoch), n)[positions[epochs == epoch] % n]
        return out

    def train_batch(
        self, step: int, batch_size: int, key: jax.Array, rows: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Training batch number `step` of a run keyed by `key`; only its rows `rows` when given
        (a process's part of the batch in a multi-host run: `Trainer.process_rows`)."""
        indices = self.train_indices(step, batch_size, key)
        return self.batch(indices if rows is None else indices[np.asarray(rows)])

    def eval_batches(self, batch_size: int, rows: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, in order; the last batch is filled with empty rows. With `rows`,
        only those rows of each batch (as `train_batch`)."""
        rows = range(batch_size) if rows is None else rows
        for start in range(0, len(self.examples), batch_size):
            yield self.batch([start + r for r in rows if start + r < len(self.examples)], rows=len(rows))
