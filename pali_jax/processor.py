"""PaliGemma input processing: images -> pixel arrays, prompts -> token ids, ids -> text.

Both halves reproduce transformers 5.24's ``PaliGemmaProcessor`` (with the PIL image backend,
``SiglipImageProcessorPil``) exactly; the tests compare them on the same inputs.

Prompt layout (one example)::

    [<image>] * num_image_tokens + <bos> + tokenize(prefix + "\\n")     token type 0 (bidirectional)
    + tokenize(suffix) + <eos>                                          token type 1 (causal; training only)
"""

import contextlib
import io
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import PIL.ImageOps
import sentencepiece as spm

from pali_jax.errors import UserError

ImageInput = str | os.PathLike | PIL.Image.Image | np.ndarray

LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(128))


class ProcessorError(UserError):
    """A user input the processor cannot handle (bad image file or array, over-long prompt, ...)."""


class ImageTooLarge(ProcessorError):
    """An image over a pixel limit, refused from its header (a server answers it 413, not 400)."""


# The largest image file decoded (width x height). A 20000 x 20000 PNG of a few kilobytes would
# decode to 1.2 GB: it is refused from its header, before any pixel is decoded. 100 megapixels is
# above any camera's output; set this module attribute to change the limit.
MAX_IMAGE_PIXELS = 100_000_000
# The longest side decoded: PIL's resize allocates filter weights in proportion to the input side
# (32 bytes a pixel for bicubic), so a 1 x 100,000,000 image within the pixel limit would still ask
# for gigabytes. No camera or scanner approaches a million pixels a side.
MAX_IMAGE_SIDE = 1_000_000
MAX_INPUT_SIDE = 4096  # the largest model input side `preprocess_images` makes (models use 224 to 896)
IMAGE_TOKEN_TEXT = "<image>"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})  # what a folder offers


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The image files (by `IMAGE_SUFFIXES`) directly in `folder`, sorted; refused when there are none."""
    folder = Path(folder)
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ProcessorError(f"folder {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Turns PIL's bomb check off while a header is read: PIL warns (on stderr) from 89 megapixels
    and raises from 179 with a message of its own; `MAX_IMAGE_PIXELS` is checked instead, in one line."""
    saved = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            yield
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(width: int, height: int, what: str, max_pixels: int | None = None) -> None:
    """Refuses an image above `MAX_IMAGE_PIXELS` (or a lower `max_pixels`) or `MAX_IMAGE_SIDE`,
    whatever it came as (file, PIL image, array), before it is decoded, converted or resized."""
    if max_pixels is not None and max_pixels < MAX_IMAGE_PIXELS and width * height > max_pixels:
        raise ImageTooLarge(f"{what} is {width}x{height} pixels, more than the limit of {max_pixels:,}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(
            f"{what} is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
            "(pali_jax.processor.MAX_IMAGE_PIXELS): refusing to decode it"
        )
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageTooLarge(
            f"{what} is {width}x{height} pixels, a side longer than the limit of {MAX_IMAGE_SIDE:,} "
            "(pali_jax.processor.MAX_IMAGE_SIDE): refusing to decode it"
        )


def numeric_array(name: str, value: object, kinds: str) -> np.ndarray:
    """`value` as a numpy array whose dtype kind is one of `kinds` ("f" float, "i" / "u" int, "b"
    bool; an empty array passes whatever its dtype), or a one-line refusal naming what it is."""
    array = None
    if not isinstance(value, (str, bytes)) and value is not None:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):  # ragged rows, objects numpy cannot hold
            pass
    if array is None or (array.size and array.dtype.kind not in kinds):
        what = f"an array of {array.dtype}" if array is not None else type(value).__name__
        raise ProcessorError(f"{name} must be an array of {'numbers' if 'f' in kinds else 'integers'}, got {what}")
    return array


def check_image_size(width: int, height: int, what: str = "the image") -> None:
    """Refuses a (width, height) that is not two ints >= 1 within `MAX_IMAGE_PIXELS`."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ProcessorError(f"{what}'s {name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    _check_pixels(int(width), int(height), what)


def _load_image_file(path: str | os.PathLike | io.BytesIO, name: str | None = None,
                     max_pixels: int | None = None) -> PIL.Image.Image:
    """Open an image file the way transformers' ``load_image`` does: EXIF transpose, then plain RGB.
    `path` may be an in-memory file (`name` then says what it is in messages)."""
    name = os.fspath(path) if name is None else name
    try:
        with _own_pixel_limit(), PIL.Image.open(path) as image:
            _check_pixels(*image.size, f"image {name}", max_pixels)
            # exif_transpose and convert both force a full decode, so truncated files fail here.
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise ProcessorError(f"image file not found: {name}") from None
    except IsADirectoryError:
        raise ProcessorError(f"image {name} is a directory, not an image file") from None
    except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
        if isinstance(e, ProcessorError):
            raise
        reason = " ".join(str(e).split())  # keep the message on one line
        raise ProcessorError(f"cannot read image file {name}: {reason}") from None


def load_image_bytes(data: bytes, name: str = "the image", max_pixels: int | None = None) -> PIL.Image.Image:
    """An image file's bytes (an upload) as an RGB PIL image, exactly as `load_image` reads the
    file from disk; refused above `max_pixels` (`ImageTooLarge`) from its header."""
    return _load_image_file(io.BytesIO(data), name, max_pixels)


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """transformers' ``convert_to_rgb``: transparency is composited onto white, other modes use PIL."""
    _check_pixels(*image.size, "the PIL image")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:  # e.g. mode "La": PIL has no conversion, and neither does transformers
        raise ProcessorError(f"cannot convert PIL image of mode {image.mode!r} to RGB: {e}") from None


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """Channels-last uint8/float array ([H, W], [H, W, 1|3|4]) -> PIL image, as transformers does.

    Floats must lie in [0, 1]. Like transformers (with ``do_rescale=False``) an RGBA float image is
    composited onto white in float, then values are scaled by 255 and truncated to uint8; this
    round-trips ``uint8 / 255`` exactly.
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ProcessorError(
            f"image array must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {list(array.shape)}"
        )
    _check_pixels(array.shape[1], array.shape[0], "the image array")
    if np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ProcessorError(
                f"float image values must lie in [0, 1], got [{array.min()}, {array.max()}]"
            )
        if array.shape[-1] == 4:
            alpha = array[..., 3:4]
            array = (alpha * array[..., :3] + (1 - alpha) * 1.0).astype(array.dtype)
        # Same arithmetic as transformers' rescale(x, 255) then astype(uint8): float64, float32, truncate.
        array = (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ProcessorError(f"image array dtype must be uint8 or floating, got {array.dtype}")
    if array.shape[-1] == 1:
        return PIL.Image.fromarray(array[..., 0])  # 2-D uint8 -> mode "L"
    # uint8 RGBA goes through PIL's alpha_composite, bit-identical to transformers' numpy blend.
    return PIL.Image.fromarray(array)


def load_image(image: ImageInput) -> PIL.Image.Image:
    """Any supported image input as an RGB PIL image, converted exactly as `preprocess_images` does."""
    if isinstance(image, (str, os.PathLike)):
        return _load_image_file(image)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _pil_to_rgb(_array_to_pil(image))
    raise ProcessorError(f"unsupported image type {type(image).__name__}: expected a path, PIL image or numpy array")


def image_list(images: ImageInput | Iterable[ImageInput], name: str = "images") -> list:
    """One image (a path, PIL image or [H, W(, C)] array) as a list of it; a list, tuple, other
    iterable or [B, H, W, C] array as a list of its elements (checked when each is loaded).
    Anything else is refused naming what it is: a single path string is one image, never a
    sequence of characters."""
    if isinstance(images, (str, os.PathLike, PIL.Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3)
    ):
        return [images]
    if isinstance(images, (bytes, dict)) or not isinstance(images, Iterable):
        raise ProcessorError(f"{name} must be an image (path, PIL image, numpy array) or a list of them, "
                             f"got {type(images).__name__}")
    return list(images)


def preprocess_images(images: ImageInput | Sequence[ImageInput], size: int) -> np.ndarray:
    """Turn images into SigLIP pixel values ``[B, size, size, 3]`` float32 in [-1, 1].

    Matches transformers' ``SiglipImageProcessorPil`` (the PIL backend PaliGemma's processor uses with
    ``backend="pil"``) bit for bit:

    - paths (``str`` / ``os.PathLike``) are opened like transformers' ``load_image``: the EXIF
      orientation tag IS applied, then ``convert("RGB")``, which drops an alpha channel without
      compositing;
    - PIL images are used as given: the EXIF orientation is NOT applied (transformers does not), and
      images with transparency (an ``A`` band or a ``transparency`` entry, e.g. RGBA, LA, PA, P) are
      composited onto white; every other mode uses PIL's ``convert("RGB")`` (16/32-bit and float
      grayscale are clipped to 0..255 there, not rescaled);
    - numpy arrays are channels-last ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]``, uint8 or
      float in [0, 1] (see ``_array_to_pil``); a 4-D array is a batch. transformers rejects ``[H, W]``
      arrays; its ``[H, W, 1]`` result is used for them.

    Then: PIL bicubic resize to (size, size) (back to uint8), x / 255, (x - 0.5) / 0.5.

    Raises:
        ProcessorError: an unreadable file (named in the message), an unsupported array or PIL mode.
    """
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or not 0 < size <= MAX_INPUT_SIDE:
        raise ProcessorError(f"image size must be an int in [1, {MAX_INPUT_SIDE}], got {size!r}")
    images = image_list(images)
    if len(images) == 0:
        raise ProcessorError("no images given")
    batch = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        resized = np.asarray(load_image(image).resize((size, size), resample=PIL.Image.BICUBIC))
        # float64 multiply then float32, as transformers' rescale does; normalise in float32.
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        batch[i] = (scaled - np.float32(0.5)) / np.float32(0.5)
    return batch


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedBatch:
    """Token arrays for a batch, all ``[B, T]``.

    ``input_ids``, ``token_type_ids`` (0 = prefix incl. image tokens, 1 = suffix; pads are 0, as in
    transformers) and ``attention_mask`` (1 = real token) are int32. ``loss_mask`` (bool) marks the
    suffix tokens, ``<eos>`` included: the positions whose token is a training target (predicted from
    the position before it).
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray


def check_text(text: str, what: str = "prompt") -> None:
    """Refuses text holding ``<image>``: the image tokens are placed by the processor. (transformers'
    processor takes ``<image>`` in a prompt as the user's own layout of image tokens and fails when
    their count is wrong; as plain text it would silently be a different prompt.) ``<locNNNN>`` and
    ``<segNNN>`` stay their single tokens, and ``<bos>`` / ``<eos>`` stay literal text (see
    `PaliGemmaTokenizer`)."""
    if not isinstance(text, str):
        raise ProcessorError(f"the {what} must be a string, got {type(text).__name__}")
    if IMAGE_TOKEN_TEXT in text:
        raise ProcessorError(f"the {what} contains {IMAGE_TOKEN_TEXT!r}: the image tokens are added automatically; remove it")


def texts(name: str, value: str | Sequence[str]) -> list[str]:
    """A string as a list of it; a list or tuple of strings as a list; anything else (bytes, a
    number, None) refused in one line naming what it is."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ProcessorError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ProcessorError(f"{name}[{i}] must be a string, got {type(text).__name__}")
    return list(value)


class PaliGemmaTokenizer:
    """Sentencepiece tokenizer of a PaliGemma checkpoint plus PaliGemma's prompt layout.

    Text is passed to sentencepiece as-is: strings such as ``"<bos>"`` or ``"<image>"`` inside a prompt
    stay literal text (transformers instead turns them into control ids). ``<locNNNN>`` and
    ``<segNNN>`` are user-defined pieces of the model, so sentencepiece keeps them atomic.

    Args:
        model_path: a ``tokenizer.model`` file, or a directory holding one.
        image_token_id: id of ``<image>``, which is not a sentencepiece piece; take it from the model
            config. Default: the sentencepiece vocabulary size, the id transformers' processor gives
            it (257152 for real checkpoints; transformers would first append a ``<mask>`` token, and
            so give ``<image>`` the next id, to a model without a ``<mask>`` piece).
    """

    def __init__(self, model_path: str | os.PathLike, image_token_id: int | None = None):
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise ProcessorError(f"tokenizer model not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            reason = " ".join(str(e).split())
            raise ProcessorError(f"cannot load tokenizer model {path}: {reason}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.image_token_id = self.vocab_size if image_token_id is None else image_token_id
        ids = (self.sp.piece_to_id(piece) for piece in LOC_TOKENS + SEG_TOKENS)
        # piece_to_id answers unk for a missing piece; keep only pieces the model really has.
        self.loc_seg_ids = frozenset(i for i in ids if i != self.sp.unk_id())

    def encode(self, text: str) -> list[int]:
        """Plain sentencepiece ids of ``text`` (no ``<bos>``/``<eos>``)."""
        return self.sp.encode(text)

    def encode_example(
        self, prefix: str, suffix: str | None = None, *, num_image_tokens: int
    ) -> tuple[list[int], list[int]]:
        """Ids and token types of one example (unpadded, untruncated), in PaliGemma's layout.

        A literal ``<image>`` in the text is refused (`check_text`)."""
        check_text(prefix, "prompt")
        if suffix is not None:
            check_text(suffix, "suffix")
        ids = [self.image_token_id] * num_image_tokens + [self.bos_id] + self.encode(prefix + "\n")
        types = [0] * len(ids)
        if suffix is not None:
            suffix_ids = self.encode(suffix) + [self.eos_id]
            ids += suffix_ids
            types += [1] * len(suffix_ids)
        return ids, types

    def _truncate(
        self, ids: list[int], types: list[int], max_length: int, num_image_tokens: int
    ) -> tuple[list[int], list[int]]:
        """Cut to ``max_length``: the suffix tail first (``<eos>`` included), then prefix text.

        The prefix's closing newline is kept so that the model still sees the prompt separator.
        """
        n_prefix = types.index(1) if 1 in types else len(types)
        if n_prefix <= max_length:
            return ids[:max_length], types[:max_length]
        newline = self.encode("\n")
        keep = max_length - len(newline)
        if keep < num_image_tokens + 1:
            raise ProcessorError(
                f"max_length={max_length} cannot hold {num_image_tokens} image tokens, <bos> and the newline"
            )
        return ids[:keep] + newline, [0] * max_length

    def __call__(
        self,
        prefixes: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        *,
        num_image_tokens: int,
        padding_side: Literal["left", "right"] = "left",
        max_length: int | None = None,
        pad_to_max_length: bool = False,
        truncate: bool = False,
    ) -> EncodedBatch:
        """Encode a batch of prompts (and, for training, target suffixes) into padded arrays.

        Args:
            prefixes: prompt text(s), e.g. ``"caption en"``.
            suffixes: target text(s) for training, one per prefix; ``<eos>`` is appended.
            num_image_tokens: ``<image>`` placeholders per example (256 for 224 px).
            padding_side: ``"left"`` for generation, ``"right"`` is usual for training.
            max_length: the longest sequence allowed (image tokens included); a longer example
                raises ``ProcessorError`` unless ``truncate`` is set.
            pad_to_max_length: pad to ``max_length`` instead of to the longest example.
            truncate: cut over-long examples (see ``_truncate``) instead of raising.
        """
        prefixes, suffixes = texts("prompts", prefixes), None if suffixes is None else texts("suffixes", suffixes)
        if suffixes is not None and len(suffixes) != len(prefixes):
            raise ProcessorError(f"got {len(suffixes)} suffixes for {len(prefixes)} prefixes")
        if len(prefixes) == 0:
            raise ProcessorError("no prompts given")
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if (pad_to_max_length or truncate) and max_length is None:
            raise ProcessorError("pad_to_max_length and truncate need max_length")

        examples = []
        for i, prefix in enumerate(prefixes):
            suffix = None if suffixes is None else suffixes[i]
            ids, types = self.encode_example(prefix, suffix, num_image_tokens=num_image_tokens)
            if max_length is not None and len(ids) > max_length:
                if not truncate:
                    raise ProcessorError(
                        f"example {i} has {len(ids)} tokens ({num_image_tokens} of them image tokens), more "
                        f"than max_length={max_length}; shorten it or pass truncate=True"
                    )
                ids, types = self._truncate(ids, types, max_length, num_image_tokens)
            examples.append((ids, types))

        length = max_length if pad_to_max_length else max(len(ids) for ids, _ in examples)
        shape = (len(examples), length)
        input_ids = np.full(shape, self.pad_id, np.int32)
        token_type_ids = np.zeros(shape, np.int32)
        attention_mask = np.zeros(shape, np.int32)
        for row, (ids, types) in enumerate(examples):
            cols = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, cols] = ids
            token_type_ids[row, cols] = types
            attention_mask[row, cols] = 1
        loss_mask = (token_type_ids == 1) & (attention_mask == 1)
        return EncodedBatch(input_ids, token_type_ids, attention_mask, loss_mask)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_loc_seg: bool = False) -> str:
        """Text of generated ids: stops at the first ``<eos>``; drops ``<pad>``, ``<bos>``, ``<image>``.

        ``<locNNNN>``/``<segNNN>`` stay in the text (``parse_detections`` needs them) unless
        ``skip_loc_seg``. Ids outside the sentencepiece vocabulary (``<image>``, the embedding
        table's padding rows) are dropped.
        """
        kept = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if not 0 <= i < self.vocab_size or (skip_loc_seg and i in self.loc_seg_ids):
                continue
            kept.append(i)
        # sentencepiece itself renders control pieces (<pad>, <bos>) as nothing.
        return self.sp.decode(kept)

    def batch_decode(self, ids: np.ndarray, *, skip_loc_seg: bool = False) -> list[str]:
        """``decode`` for each row of a ``[B, T]`` array."""
        return [self.decode(row, skip_loc_seg=skip_loc_seg) for row in np.asarray(ids)]


class PaliGemmaProcessor:
    """Images and prompts -> model inputs, like transformers' ``PaliGemmaProcessor``.

    Args:
        tokenizer: the checkpoint's tokenizer.
        image_size: the vision tower's input resolution (224, 448 or 896).
        num_image_tokens: image tokens per image, ``(image_size // patch_size) ** 2``.
    """

    def __init__(self, tokenizer: PaliGemmaTokenizer, image_size: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        prefixes: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        **text_kwargs,
    ) -> dict[str, np.ndarray]:
        """One image per prompt. Returns ``pixel_values`` ``[B, size, size, 3]`` and the fields of
        ``EncodedBatch``; ``text_kwargs`` go to ``PaliGemmaTokenizer.__call__``."""
        pixel_values = preprocess_images(images, self.image_size)
        text = self.tokenizer(prefixes, suffixes, num_image_tokens=self.num_image_tokens, **text_kwargs)
        if len(pixel_values) != len(text.input_ids):
            raise ProcessorError(f"got {len(pixel_values)} images for {len(text.input_ids)} prompts")
        return {"pixel_values": pixel_values, **vars(text)}
