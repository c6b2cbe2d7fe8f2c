"""Segmentation masks: big_vision's VQ-VAE for PaliGemma's 16 `<segNNN>` codes, both ways.

PaliGemma answers ``segment cat`` with ``<locY1><locX1><locY2><locX2>`` then 16 ``<segNNN>`` codes
(0..127). The codes index the codebook of a small VQ-VAE (Ning et al. 2023, arXiv:2301.02229)
trained on Open Images; big_vision publishes it as ``vae-oid.npz`` (PyTorch tensor names and
layouts). Decoding: 16 codebook rows -> a 4x4x512 latent -> 1x1 conv, two residual blocks, four
stride-2 transposed convolutions -> 64x64 mask logits in about [-1, 1]. Encoding (training data):
a mask cropped to its box and resized to 64x64 -> four stride-2 convolutions, two residual blocks,
a 1x1 conv -> 4x4 vectors of 512 -> the nearest codebook row of each.

The numerics follow big_vision: the decoder of `evaluators/proj/paligemma/transfers/segmentation.py`
(Flax `ConvTranspose(padding=2, transpose_kernel=True)`, i.e. PyTorch's `ConvTranspose2d(4, 2, 1)`),
the encoder of `pp/proj/paligemma/segmentation.py` (TF "SAME" padding, input 2 * (m - 0.5),
squared-L2 nearest neighbour), and its evaluator's paste-back (`paste_mask`).

    vae = MaskDecoder.from_npz("vae-oid.npz")
    logits = vae.decode(codes)                          # [B, 16] ints -> [B, 64, 64] float32
    mask = paste_mask(logits[0], locs, height, width)   # -> bool [H, W]
    suffix = vae.mask_suffix(mask, label="cat")         # bool [H, W] -> "<loc..>x4<seg..>x16 cat"
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from pali_jax.detection import Detection
from pali_jax.errors import UserError
from pali_jax.generation_config import check_memory, program_bytes
from pali_jax.processor import check_image_size, numeric_array

NUM_CODES = 16  # <segNNN> tokens per mask: a 4x4 latent grid
CODEBOOK_SIZE = 128
MASK_SIZE = 64  # the decoder's output, and the encoder's input, is 64x64
LOC_BINS = 1024
CODEBOOK = "_vq_vae._embedding"
DEFAULT_URL = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz"  # gs://big_vision/paligemma/vae-oid.npz
ENV_VAR = "PALI_JAX_SEG_VAE"

# PyTorch module indices of the two nn.Sequential stacks in the file (odd indices are the ReLUs).
_DECODER_CONVS = ("decoder.0",)
_DECODER_RES = ("decoder.2.net", "decoder.3.net")
_DECODER_UP = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")
_DECODER_OUT = "decoder.12"
_ENCODER_DOWN = ("encoder.0", "encoder.2", "encoder.4", "encoder.6")
_ENCODER_RES = ("encoder.8.net", "encoder.9.net")
_ENCODER_OUT = "encoder.10"
_RES_CONVS = (".0", ".2", ".4")  # 3x3, ReLU, 3x3, ReLU, 1x1


class SegmentationError(UserError):
    """A VQ-VAE file, codes or mask that cannot be used (one line: what and where)."""


# -- the networks ------------------------------------------------------------------------------
def _hwio(weight: np.ndarray) -> np.ndarray:
    """PyTorch conv weight [out, in, kh, kw] (transposed conv: [in, out, kh, kw]) -> [kh, kw, ., .]."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)), np.float32)


class _ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))), each conv biased; the width is kept."""

    padding: str | int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.relu(nn.Conv(width, (3, 3), padding=self.padding, name="Conv_0")(x))
        h = nn.relu(nn.Conv(width, (3, 3), padding=self.padding, name="Conv_1")(h))
        return x + nn.Conv(width, (1, 1), padding=0, name="Conv_2")(h)


class _Decoder(nn.Module):
    """4x4 latent [B, 4, 4, 512] -> mask logits [B, 64, 64, 1]. Feature counts come from the kernels."""

    features: tuple[int, ...]  # of the 1x1 conv, then of each transposed conv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(self.features[0], (1, 1), padding=0, name="Conv_0")(x))
        for i in range(len(_DECODER_RES)):
            x = _ResBlock(padding=1, name=f"ResBlock_{i}")(x)
        for i, width in enumerate(self.features[1:]):
            # lax.conv_transpose padding 2 on a 4x4 kernel = PyTorch ConvTranspose2d padding 4 - 1 - 2 = 1:
            # each stage doubles the grid exactly (4 -> 8 -> 16 -> 32 -> 64).
            x = nn.ConvTranspose(width, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True,
                                 name=f"ConvTranspose_{i}")(x)
            x = nn.relu(x)
        return nn.Conv(1, (1, 1), padding=0, name="Conv_1")(x)


class _Encoder(nn.Module):
    """Mask [B, 64, 64, 1] in [-1, 1] -> latent [B, 4, 4, 512]."""

    features: tuple[int, ...]  # of each stride-2 conv, then of the output 1x1 conv
    kernels: tuple[int, ...]  # kernel size of each stride-2 conv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (width, k) in enumerate(zip(self.features[:-1], self.kernels)):
            # "SAME" is TensorFlow's rule (more padding after than before when odd), as big_vision's tf.nn.conv2d.
            x = nn.relu(nn.Conv(width, (k, k), strides=(2, 2), padding="SAME", name=f"Conv_{i}")(x))
        for i in range(len(_ENCODER_RES)):
            x = _ResBlock(padding="SAME", name=f"ResBlock_{i}")(x)
        return nn.Conv(self.features[-1], (1, 1), padding="SAME", name=f"Conv_{len(self.kernels)}")(x)


def _conv(weights: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"kernel": _hwio(weights[name + ".weight"]), "bias": np.asarray(weights[name + ".bias"], np.float32)}


def _resblock(weights: Mapping[str, np.ndarray], name: str) -> dict[str, dict[str, np.ndarray]]:
    return {f"Conv_{i}": _conv(weights, name + suffix) for i, suffix in enumerate(_RES_CONVS)}


def _decoder_names() -> list[str]:
    names = [*_DECODER_CONVS, *_DECODER_UP, _DECODER_OUT]
    names += [res + s for res in _DECODER_RES for s in _RES_CONVS]
    return names


def _encoder_names() -> list[str]:
    return [*_ENCODER_DOWN, _ENCODER_OUT, *(res + s for res in _ENCODER_RES for s in _RES_CONVS)]


def _bucket(n: int) -> int:
    """Batch sizes are padded to a power of two, so a stream of odd batch sizes compiles few programs."""
    return 1 << max(0, (n - 1).bit_length())


# Rows per compiled call of the decoder or encoder: a larger batch runs in chunks of this many, so
# XLA's temporaries stay bounded whatever a caller passes (`MaskDecoder._check_memory` measures
# them from the compiled chunk); only the host result grows with the batch.
CHUNK_ROWS = 256


def _chunk_rows(n: int) -> int:
    """Rows of each compiled call for a batch of n: its power-of-two bucket, at most `CHUNK_ROWS`."""
    return min(_bucket(max(n, 1)), CHUNK_ROWS)


# -- the model ---------------------------------------------------------------------------------
class MaskDecoder:
    """big_vision's segmentation VQ-VAE (`vae-oid.npz`): `decode` codes -> 64x64 logits, and
    `encode` 64x64 masks -> codes when the file holds the encoder too.

    `weights` maps the file's own names (`_vq_vae._embedding`, `decoder.0.weight`, ...) to arrays in
    PyTorch layout; use `from_npz` for a file. Every tensor the decoder needs must be there with a
    consistent shape; encoder tensors are optional (`has_encoder`). Other members are ignored.
    """

    def __init__(self, weights: Mapping[str, np.ndarray], source: str = "weights"):
        self.source = source
        if not isinstance(weights, Mapping):
            raise SegmentationError(f"weights must be a mapping of names to arrays, got {type(weights).__name__}")
        optional = {n + p for n in _encoder_names() for p in (".weight", ".bias")}
        needed = [CODEBOOK, *(n + p for n in _decoder_names() for p in (".weight", ".bias"))]
        # Every tensor used is checked as data here, so that nothing later converts a bad one.
        weights = {name: _tensor(weights, source, name) for name in [*needed, *sorted(optional & set(weights))]}
        codebook = weights[CODEBOOK]
        if codebook.ndim != 2 or codebook.shape[0] != CODEBOOK_SIZE:
            raise SegmentationError(f"{source}: {CODEBOOK} has shape {codebook.shape}, expected [{CODEBOOK_SIZE}, dim]")
        dim = codebook.shape[1]
        features = (weights[_DECODER_CONVS[0] + ".weight"].shape[0],
                    *(weights[n + ".weight"].shape[1] for n in _DECODER_UP))
        self.codebook = codebook
        self._decoder_params = {
            "Conv_0": _conv(weights, _DECODER_CONVS[0]),
            **{f"ResBlock_{i}": _resblock(weights, n) for i, n in enumerate(_DECODER_RES)},
            **{f"ConvTranspose_{i}": _conv(weights, n) for i, n in enumerate(_DECODER_UP)},
            "Conv_1": _conv(weights, _DECODER_OUT),
        }
        self._decoder = _Decoder(features)
        _check_shapes(self._decoder, self._decoder_params, (1, 4, 4, dim), source)
        self._decode = jax.jit(self._decode_impl)
        self._resident = jax.device_put((self._decoder_params, codebook))  # placed once, not at every call

        self.has_encoder = all(n + ".weight" in weights and n + ".bias" in weights for n in _encoder_names())
        if self.has_encoder:
            enc_features = (*(weights[n + ".weight"].shape[0] for n in _ENCODER_DOWN),
                            weights[_ENCODER_OUT + ".weight"].shape[0])
            kernels = tuple(weights[n + ".weight"].shape[-1] for n in _ENCODER_DOWN)
            self._encoder_params = {
                **{f"Conv_{i}": _conv(weights, n) for i, n in enumerate(_ENCODER_DOWN)},
                **{f"ResBlock_{i}": _resblock(weights, n) for i, n in enumerate(_ENCODER_RES)},
                f"Conv_{len(_ENCODER_DOWN)}": _conv(weights, _ENCODER_OUT),
            }
            self._encoder = _Encoder(enc_features, kernels)
            _check_shapes(self._encoder, self._encoder_params, (1, MASK_SIZE, MASK_SIZE, 1), source)
            latent = jax.eval_shape(self._encoder.apply, {"params": self._encoder_params},
                                    jax.ShapeDtypeStruct((1, MASK_SIZE, MASK_SIZE, 1), jnp.float32))
            if latent.shape != (1, 4, 4, dim):
                raise SegmentationError(f"{source}: the encoder gives latents {latent.shape}, expected (1, 4, 4, {dim})")
            self._encode = jax.jit(self._encode_impl)
            self._resident_encoder = jax.device_put((self._encoder_params, codebook))

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "MaskDecoder":
        """Reads big_vision's `vae-oid.npz` (or a file with the same member names)."""
        path = Path(path).expanduser()
        try:
            npz = np.load(path, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):  # a .npy file: one bare array
                raise ValueError("not an .npz archive of named arrays")
            with npz:
                weights = {name: npz[name] for name in npz.files}
        except FileNotFoundError:
            raise SegmentationError(f"mask VAE file not found: {path} (download it from {DEFAULT_URL})") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:  # BadZipFile: a CRC error too
            raise SegmentationError(f"cannot read mask VAE {path}: {' '.join(str(e).split())[:200]}") from None
        return cls(weights, str(path))

    # -- decoding ------------------------------------------------------------------------------
    def _decode_impl(self, params, codebook, codes):
        latent = jnp.take(codebook, codes.reshape(-1), axis=0).reshape(codes.shape[0], 4, 4, codebook.shape[1])
        return self._decoder.apply({"params": params}, latent)[..., 0]

    def decode(self, codes: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Codes [B, 16] (ints in [0, 128), row-major over the 4x4 grid) -> mask logits [B, 64, 64]
        float32, about [-1, 1]; > 0 is inside. One jitted call per `CHUNK_ROWS` rows; a batch whose
        result or program would not fit in memory is refused before anything runs."""
        codes = numeric_array("codes", codes, "iu")
        if codes.ndim != 2 or codes.shape[1] != NUM_CODES:
            raise SegmentationError(f"codes must be [B, {NUM_CODES}] integers, got shape {list(codes.shape)}")
        if not len(codes):
            return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        self._check_memory(self._decode, self._resident, codes.shape, np.int32, "codes")  # before a pass over them
        if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
            raise SegmentationError(f"codes must lie in [0, {CODEBOOK_SIZE}), got {codes.min()}..{codes.max()}")
        return self._run_chunked(self._decode, self._resident, codes.astype(np.int32, copy=False))

    def _check_memory(self, program, resident, shape: tuple[int, ...], dtype, parameter: str) -> None:
        """Refuses a batch of `shape` whose host result, or whose chunk program (XLA's own count of
        what it allocates), exceeds free memory; both together on CPU, where they share it."""
        n = shape[0]
        rows = _chunk_rows(n)
        chunk = jax.ShapeDtypeStruct((rows, *shape[1:]), dtype)
        device_need = program_bytes(program, *resident, chunk, resident=resident)
        out = jax.eval_shape(program, *resident, chunk)
        host_need = n * out.dtype.itemsize * math.prod(out.shape[1:])
        host = jax.local_devices(backend="cpu")[0]
        on_cpu = jax.devices()[0].platform == "cpu"
        what = f"{n} row{'s' * (n != 1)} of {parameter} ({rows} per compiled call)"
        advice = f"pass fewer {parameter} per call"
        check_memory(host_need + device_need * on_cpu, f"the results of {what}", parameter, device=host,
                     task="the mask VAE", advice=advice)
        if not on_cpu:
            check_memory(device_need, f"the program of {what}", parameter, task="the mask VAE", advice=advice)

    @staticmethod
    def _run_chunked(program, resident, inputs: np.ndarray) -> np.ndarray:
        """`program(*resident, chunk)` over `inputs` [B, ...] in chunks of `CHUNK_ROWS` rows at most
        (a smaller batch padded to a power of two), into one host array."""
        n = inputs.shape[0]
        rows = _chunk_rows(n)
        out_shape = jax.eval_shape(program, *resident, jax.ShapeDtypeStruct((rows, *inputs.shape[1:]), inputs.dtype))
        out = np.empty((n, *out_shape.shape[1:]), out_shape.dtype)
        for start in range(0, n, rows):
            chunk = inputs[start : start + rows]
            padded = np.zeros((rows, *inputs.shape[1:]), inputs.dtype)
            padded[: len(chunk)] = chunk
            out[start : start + len(chunk)] = np.asarray(program(*resident, padded))[: len(chunk)]
        return out

    def add_masks(self, boxes: Sequence[list[Detection]], sizes: Sequence[tuple[int, int]]) -> list[list[Detection]]:
        """Each image's boxes (`sizes`: its (width, height)) with the `<seg>` codes of those that carry
        them decoded (one call for all the images) and pasted into that image as `Detection.mask`."""
        coded = [det for image in boxes for det in image if det.seg_codes is not None]
        masks = iter(self.decode([det.seg_codes for det in coded]) if coded else ())
        return [
            [dataclasses.replace(det, mask=paste_mask(next(masks), det.locs, height, width))
             if det.seg_codes is not None else det for det in image]
            for image, (width, height) in zip(boxes, sizes)
        ]

    # -- encoding ------------------------------------------------------------------------------
    def _encode_impl(self, params, codebook, masks):
        z = self._encoder.apply({"params": params}, 2.0 * (masks[..., None] - 0.5))
        flat = z.reshape(-1, codebook.shape[1])
        distances = (jnp.sum(flat**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)
                     - 2.0 * flat @ codebook.T)
        return jnp.argmin(distances, axis=1).reshape(masks.shape[0], NUM_CODES).astype(jnp.int32)

    def encode(self, masks: np.ndarray) -> np.ndarray:
        """64x64 masks [B, 64, 64] in [0, 1] (already cropped to their boxes and resized, see
        `mask_tokens`) -> codes [B, 16] int32."""
        if not self.has_encoder:
            raise SegmentationError(f"{self.source} holds no encoder weights (encoder.0 ... encoder.10): "
                                    "it can decode masks but not encode them")
        masks = numeric_array("masks", masks, "biuf")
        if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
            raise SegmentationError(f"masks must be [B, {MASK_SIZE}, {MASK_SIZE}], got {list(masks.shape)}")
        if not len(masks):
            return np.zeros((0, NUM_CODES), np.int32)
        self._check_memory(self._encode, self._resident_encoder, masks.shape, np.float32, "masks")
        return self._run_chunked(self._encode, self._resident_encoder, masks.astype(np.float32, copy=False))

    def mask_tokens(self, mask: np.ndarray, box: Sequence[float] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A mask of an image -> (4 `<loc>` bins y1, x1, y2, x2; 16 codes), as big_vision's
        `refcoco_mask2str` makes training targets.

        mask: [H, W], bool or numbers (> 0.5 of the maximum 1, or 255 for uint8, is inside: it is
        scaled to [0, 1]). box: (xmin, ymin, xmax, ymax) in pixels of the image; default the
        tight box of the mask's nonzero pixels. As big_vision: the box as fractions of the image,
        loc bins = round(fraction * 1023), the crop = rows round(H * y1) .. round(H * y2) (same for
        columns), resized to 64x64 with an antialiased bilinear filter (`resize_antialiased`:
        tf.image.resize(method="bilinear", antialias=True), big_vision's, as jax.image.resize has it).
        """
        m = _unit_mask(mask)
        h, w = m.shape
        if box is None:
            rows, cols = np.nonzero(m > 0)
            if rows.size == 0:
                raise SegmentationError("the mask is empty: no box to encode (give a box, or a mask with pixels)")
            box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise SegmentationError(f"box {list(box)} is not a non-empty box inside the {w}x{h} image")
        frac = np.array([y0 / h, x0 / w, y1 / h, x1 / w])
        locs = tuple(int(v) for v in np.clip(np.round(frac * (LOC_BINS - 1)), 0, LOC_BINS - 1))
        r0, c0, r1, c1 = (int(v) for v in np.round(frac * np.array([h, w, h, w])))
        crop = m[r0:r1, c0:c1]
        if crop.size == 0:
            raise SegmentationError(f"box {list(box)} covers no whole pixel of the {w}x{h} mask")
        small = resize_antialiased(crop, MASK_SIZE, MASK_SIZE)
        return locs, tuple(int(c) for c in self.encode(small[None])[0])

    def mask_suffix(self, mask: np.ndarray, box: Sequence[float] | None = None, label: str = "") -> str:
        """A training suffix `<locY1><locX1><locY2><locX2><segNNN>x16 label` (see `mask_tokens`)."""
        locs, codes = self.mask_tokens(mask, box)
        text = "".join(f"<loc{v:04d}>" for v in locs) + "".join(f"<seg{c:03d}>" for c in codes)
        return f"{text} {label}" if label else text


def _tensor(weights: Mapping[str, np.ndarray], source: str, name: str) -> np.ndarray:
    """weights[name] as float32, refused unless it is there, numeric, finite and of its rank (a conv
    kernel 4, a bias 1, the codebook 2)."""
    try:
        value = weights[name]
    except KeyError:
        raise SegmentationError(f"{source} has no tensor {name!r}: not big_vision's mask VAE (vae-oid.npz)?") from None
    array = np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else None
    if array is None or array.dtype.kind not in "fiu":
        what = f"dtype {array.dtype}" if array is not None else type(value).__name__
        raise SegmentationError(f"{source}: tensor {name!r} holds {what}, expected float numbers")
    rank = 4 if name.endswith(".weight") else 1 if name.endswith(".bias") else 2
    if array.ndim != rank or array.size == 0:
        raise SegmentationError(f"{source}: tensor {name!r} has shape {list(array.shape)}, expected {rank} non-empty axes")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise SegmentationError(f"{source}: tensor {name!r} holds NaN or infinite values: the file is damaged")
    return array


def _check_shapes(module: nn.Module, params: dict, input_shape: tuple[int, ...], source: str) -> None:
    """The file's tensors against what the network, built from their own feature counts, expects."""
    try:
        expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
    except Exception as e:  # a kernel whose input width does not match the previous layer's output
        raise SegmentationError(f"{source}: the mask VAE's tensors do not fit together ({type(e).__name__})") from None
    want = jax.tree_util.tree_flatten_with_path(expected["params"])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in want:
        if path not in got or tuple(got[path].shape) != tuple(leaf.shape):
            where = "/".join(str(k.key) for k in path)
            shape = None if path not in got else tuple(got[path].shape)
            raise SegmentationError(f"{source}: {where} has shape {shape}, expected {tuple(leaf.shape)}")


def _unit_mask(mask) -> np.ndarray:
    """A mask as float32 [H, W] in [0, 1]."""
    m = numeric_array("a mask", mask, "biuf")
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
        m = m[..., 0]
    if m.ndim != 2 or m.size == 0:
        raise SegmentationError(f"a mask must be [H, W], got shape {list(np.shape(mask))}")
    if m.dtype == bool:
        return m.astype(np.float32)
    if m.dtype == np.uint8:
        return m.astype(np.float32) / 255.0 if m.max() > 1 else m.astype(np.float32)
    return np.clip(m.astype(np.float32), 0.0, 1.0)


def _triangle_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] rows of the antialiased bilinear filter: a triangle widened by the
    downscaling factor (never narrowed), centred on each output pixel's centre, normalized."""
    scale = size_in / size_out
    centres = (np.arange(size_out) + 0.5) * scale - 0.5
    x = np.abs(centres[:, None] - np.arange(size_in)[None, :]) / max(scale, 1.0)
    weights = np.maximum(0.0, 1.0 - x)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_antialiased(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] float -> [height, width] float32 by an antialiased bilinear filter, separably: what
    tf.image.resize(method="bilinear", antialias=True) and jax.image.resize(..., antialias=True)
    compute, in numpy (no compile per crop size)."""
    a = np.asarray(image, np.float64)
    out = _triangle_weights(a.shape[0], height) @ a @ _triangle_weights(a.shape[1], width).T
    return out.astype(np.float32)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image file (PNG, ...) as bool [H, W]: nonzero pixels of its first channel (or of L)."""
    if not isinstance(path, (str, os.PathLike)):
        raise SegmentationError(f"a mask file must be a path, got {type(path).__name__}")
    try:
        with PIL.Image.open(path) as img:
            arr = np.asarray(img.convert("L") if img.mode not in ("1", "L", "I", "I;16", "F") else img)
    except FileNotFoundError:
        raise SegmentationError(f"mask file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SegmentationError(f"cannot read mask {path}: {' '.join(str(e).split())}") from None
    return arr > 0


# -- paste-back --------------------------------------------------------------------------------
def mask_box(locs: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """The pixel box (x1, y1, x2, y2) a mask is pasted into: big_vision's evaluator rule.

    `<loc>` bins y1, x1, y2, x2 are divided by 1023 (not 1024: big_vision's segmentation evaluator
    and its data pipeline, which made the masks' training targets with round(fraction * 1023)),
    times the image height / width, truncated by int(). `Detection`'s box fields keep the
    detection convention (/ 1024), so a mask's box can differ from its detection box by a pixel.
    """
    y1, x1, y2, x2 = (v / (LOC_BINS - 1) for v in locs)
    return int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)


def paste_mask(logits: np.ndarray, locs: Sequence[int], height: int, width: int) -> np.ndarray:
    """A 64x64 mask (logits) -> bool [height, width] mask of the whole image.

    As big_vision's evaluator: the box from `mask_box`, the 64x64 logits resized to the box's size
    with PIL's bilinear filter (on float32, mode "F"), inside where > 0. A box that is empty after
    int() (x2 <= x1 or y2 <= y1, e.g. swapped corners) gives an empty mask, as big_vision counts
    it invalid. Parts of a box outside the image are cut off.
    """
    check_image_size(width, height)
    locs = locs.tolist() if isinstance(locs, np.ndarray) else locs
    if isinstance(locs, (str, bytes)) or not isinstance(locs, Sequence) or len(locs) != 4 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in locs):
        raise SegmentationError(f"locs must be 4 <loc> bins (ints: y1, x1, y2, x2), got {locs!r}")
    m = numeric_array("mask logits", logits, "fiu").astype(np.float32)
    if m.shape != (MASK_SIZE, MASK_SIZE):
        raise SegmentationError(f"mask logits must be [{MASK_SIZE}, {MASK_SIZE}], got {list(m.shape)}")
    out = np.zeros((height, width), bool)
    x1, y1, x2, y2 = mask_box(locs, height, width)
    if x2 <= x1 or y2 <= y1:
        return out
    inside = np.asarray(PIL.Image.fromarray(m).resize((x2 - x1, y2 - y1), resample=PIL.Image.BILINEAR)) > 0.0
    ys, xs = slice(max(y1, 0), min(y2, height)), slice(max(x1, 0), min(x2, width))
    out[ys, xs] = inside[ys.start - y1 : ys.stop - y1, xs.start - x1 : xs.stop - x1]
    return out


def resolve_vae_path(path: str | os.PathLike | None) -> str | None:
    """`path`, else the `PALI_JAX_SEG_VAE` environment variable, else None."""
    return str(path) if path else (os.environ.get(ENV_VAR) or None)


# -- COCO run-length encoding ------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> dict[str, object]:
    """COCO's compressed RLE of a bool [H, W] mask: {"size": [H, W], "counts": str}.

    pycocotools' `mask.encode` when it is installed (the `seg` extra); otherwise the same format
    written here: run lengths over the column-major pixels starting with a run of zeros, each
    from the third on stored as the difference to the one two before, in 5-bit groups + 48.
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise SegmentationError(f"a mask must be [H, W], got shape {list(m.shape)}")
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _rle_string(_run_lengths(m))}
    rle = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _run_lengths(m: np.ndarray) -> list[int]:
    flat = m.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def _rle_string(counts: list[int]) -> str:
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


def rle_decode(rle: Mapping[str, object]) -> np.ndarray:
    """A compressed COCO RLE ({"size", "counts": str}) -> bool [H, W] (the inverse of `rle_encode`)."""
    h, w = (int(v) for v in rle["size"])
    s = str(rle["counts"])
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(h * w, bool)
    pos = 0
    for i, n in enumerate(counts):
        if i % 2:
            flat[pos : pos + n] = True
        pos += n
    return flat.reshape((w, h)).T
