"""`PaliGemma`: a loaded model (config + params + tokenizer) with its compiled entry points.

    pg = PaliGemma.from_pretrained("path/or/hub-id", dtype="float32")
    [result] = pg.generate("cat.jpg", "caption en")           # text, token_ids, boxes
    for piece in pg.stream("cat.jpg", "answer en what is this?"): print(piece, end="")
    logits = pg.forward(pixel_values, input_ids, token_type_ids, attention_mask)   # arrays
    out = pg.generate_ids(pixel_values, input_ids, attention_mask=mask)             # arrays
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pali_jax import hf_weights, sharding
from pali_jax.beam_search import BeamSearch
from pali_jax.checkpoint import read_params
from pali_jax.config import PaliGemmaConfig
from pali_jax.detection import Detection, parse_detections
from pali_jax.errors import UserError
from pali_jax.gemma import weights_out_first
from pali_jax.model_dir import CONFIG_FILE, PARAMS_DIR, SIDE_FILES, read_model_config
from pali_jax.generate import GenerateOutput, Generator, jit_model_program
from pali_jax.paligemma import PaliGemmaModel, abstract_params, split_layers
from pali_jax.processor import ImageInput, PaliGemmaTokenizer, check_prompt_lengths, load_image, preprocess_images
from pali_jax.sampling import SamplingParams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a hub download fetches: exactly the files the loader reads or a conversion carries over;
# never PyTorch .bin duplicates, code, or anything else a repository may hold.
HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                *SIDE_FILES]


@dataclasses.dataclass(frozen=True)
class Result:
    """One generated answer. `token_ids` are the generated ids only (a final EOS included, as HF
    returns it); `boxes` are the `<loc>` detections scaled to the original image."""

    text: str
    token_ids: list[int]
    boxes: list[Detection]
    stop_reason: str


def sampling_params(temperature: float | None, top_k: int | None, top_p: float | None) -> SamplingParams:
    """Greedy unless a sampling option is given; temperature defaults to 1.0 when sampling."""
    if temperature is None and top_k is None and top_p is None:
        return SamplingParams.greedy()
    return SamplingParams.make(1.0 if temperature is None else temperature, top_k or 0, 1.0 if top_p is None else top_p)


def _pair(images, prompts) -> tuple[list, list[str]]:
    """One image per prompt; a single image or a single prompt is repeated to match the other."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(images) != len(prompts) or not prompts:
        raise UserError(f"got {len(images)} images for {len(prompts)} prompts")
    return images, prompts


@dataclasses.dataclass
class PaliGemma:
    """A PaliGemma model ready to run. `params` is a nested dict of jax arrays (`img/...`, `llm/...`)."""

    config: PaliGemmaConfig
    params: Any
    dtype: Any = jnp.float32
    path: Path | None = None  # where it was loaded from (tokenizer files live there)
    mesh: Mesh | None = None  # the mesh `params` are sharded over (pali_jax.sharding); None: one device
    scan_layers: bool = True  # False: `params` holds each decoder layer apart (`paligemma.split_layers`)
    out_first: bool = False  # the layers' projection weights are stored [*out, *in] (`paligemma.split_layers`)

    def __post_init__(self):
        self.module = PaliGemmaModel(self.config, self.dtype, scan_layers=self.scan_layers, out_first=self.out_first)
        self.generator = Generator(self.module, self.mesh)
        self.beam_search = BeamSearch(self.module, self.mesh)
        self._forward = jit_model_program(self.module.apply)

    @functools.cached_property
    def tokenizer(self) -> PaliGemmaTokenizer:
        """The checkpoint's sentencepiece tokenizer (`tokenizer.model` beside the weights)."""
        if self.path is None or not (self.path / "tokenizer.model").exists():
            raise UserError(
                f"no tokenizer.model in {self.path}: text prompts need one (or use generate_ids with token ids)"
            )
        return PaliGemmaTokenizer(self.path, image_token_id=self.config.image_token_id)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: str = "float32",
        *,
        sliding_window: bool = True,
        mesh: Mesh | None = None,
        scan_layers: bool = True,
    ) -> "PaliGemma":
        """Loads a converted directory, an HF checkpoint directory (converted in memory) or a hub id.

        dtype: "float32" or "bfloat16" (parameters and activations). sliding_window=False turns
        Gemma 2's sliding window off on every layer (big_vision's behaviour; see README).
        mesh (`pali_jax.sharding.make_mesh`): every parameter is loaded straight onto its shards.
        scan_layers=False keeps each decoder layer's weights apart (`llm/layers_0/...`) instead of
        stacked: faster decoding on CPU, longer compiles, and not the layout training uses (README).
        In bfloat16 on CPU those layers also hold their projections output axes first
        (`gemma.weights_out_first`), transposed once here.
        """
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        if not scan_layers and mesh is not None:
            raise UserError("scan_layers=False is for one device: the mesh's partition rules expect stacked layers")
        path = Path(path_or_hub_id).expanduser()
        if not path.exists():
            path = _download(str(path_or_hub_id))
        if (path / CONFIG_FILE).exists():
            config = read_model_config(path)
            if mesh is not None:
                params = sharding.restore_sharded(path / PARAMS_DIR, config, mesh, DTYPES[dtype])
            else:  # host arrays: split below as views, then made device arrays (in place on CPU)
                params = read_params(path / PARAMS_DIR, abstract_params(config, DTYPES[dtype]))
        elif (path / "config.json").exists() and mesh is not None:
            config, params = sharding.load_hf_sharded(path, mesh, dtype)
        elif (path / "config.json").exists():
            config, host = hf_weights.load_hf(path, dtype)
            params = jax.tree.map(jnp.asarray, host)
        else:
            raise UserError(f"{path} is neither a pali-jax directory ({CONFIG_FILE}) nor an HF checkpoint (config.json)")
        if not sliding_window:
            config = config.without_sliding_window()
        out_first = not scan_layers and weights_out_first(DTYPES[dtype])
        if not scan_layers:
            params = split_layers(params, out_first)
        if mesh is None:
            params = jax.device_put(params)
        return cls(config, params, DTYPES[dtype], path, mesh, scan_layers, out_first)

    # -- model calls ---------------------------------------------------------------------------
    def _check(self, pixel_values, input_ids) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.asarray(pixel_values, np.float32)
        ids = np.asarray(input_ids, np.int32)
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise UserError(f"pixel_values must be [B, {size}, {size}, 3], got {list(pixels.shape)}")
        if ids.ndim != 2 or ids.shape[0] != pixels.shape[0]:
            raise UserError(f"input_ids must be [B, T] with B = {pixels.shape[0]}, got {list(ids.shape)}")
        counts = (ids == self.config.image_token_id).sum(axis=1)
        if (counts != self.config.num_image_tokens).any():
            raise UserError(
                f"every row needs {self.config.num_image_tokens} <image> tokens (id {self.config.image_token_id}); "
                f"got {counts.tolist()}"
            )
        if ids.max() >= self.config.vocab_size or ids.min() < 0:
            raise UserError(f"input_ids must lie in [0, {self.config.vocab_size})")
        return pixels.astype(self.dtype), ids

    def forward(self, pixel_values, input_ids, token_type_ids=None, attention_mask=None) -> jax.Array:
        """Logits [B, T, V] float32. pixel_values [B, H, W, 3] in [-1, 1]; input_ids [B, T] with the
        image tokens in place. token_type_ids None: all prefix; attention_mask None: no padding."""
        pixels, ids = self._check(pixel_values, input_ids)
        return self._forward({"params": self.params}, pixels, ids, token_type_ids, attention_mask)

    def generate_ids(
        self,
        pixel_values,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_tokens: tuple[int, ...] = (),
        cache_length: int | None = None,
    ) -> GenerateOutput:
        """Decodes left-padded prompts given as arrays. Greedy unless temperature > 0.

        Returns token ids [B, n], lengths [B] and why each row stopped.
        """
        pixels, ids = self._check(pixel_values, input_ids)
        sampling = SamplingParams.make(temperature, top_k, top_p)
        return self.generator.generate(
            self.params, pixels, ids, token_type_ids, attention_mask, max_new_tokens=max_new_tokens,
            sampling=sampling, seed=seed, stop_tokens=stop_tokens, cache_length=cache_length,
        )

    # -- images and strings --------------------------------------------------------------------
    def _encode(self, images: Sequence[ImageInput], prompts: Sequence[str], max_new_tokens: int):
        pixels = preprocess_images(list(images), self.config.image_size).astype(self.dtype)
        batch = self.tokenizer(list(prompts), num_image_tokens=self.config.num_image_tokens)
        check_prompt_lengths(batch.attention_mask.sum(axis=1), self.config, max_new_tokens)
        return pixels, batch

    def generate(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 32,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        beams: int = 1,
        length_penalty: float = 1.0,
        seed: int = 0,
        batch_size: int | None = None,
        stop_tokens: tuple[int, ...] = (),
    ) -> list[Result]:
        """Answers each (image, prompt) pair: paths, PIL images or arrays, and prompt strings such as
        "caption en", "answer en what is on the table?" or "detect cat ; dog".

        Greedy unless a sampling option (temperature, top_k, top_p) is given; `beams` > 1 runs beam
        search. A single image or prompt is paired with every one of the others. `batch_size`
        splits the work into batches (default: all at once).
        """
        images, prompts = _pair(images, prompts)
        sampling = sampling_params(temperature, top_k, top_p)
        if beams > 1 and sampling.temperature > 0:
            raise UserError("beam search is deterministic: drop temperature / top_k / top_p, or use beams=1")
        loaded = [load_image(image) for image in images]
        step = batch_size or len(prompts)
        if step < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        results = []
        for start in range(0, len(prompts), step):
            chunk = loaded[start : start + step]
            pixels, enc = self._encode(chunk, prompts[start : start + step], max_new_tokens)
            args = (self.params, pixels, enc.input_ids, enc.token_type_ids, enc.attention_mask)
            if beams > 1:
                out = self.beam_search.search(
                    *args, beams=beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                    stop_tokens=stop_tokens,
                )
            else:
                out = self.generator.generate(
                    *args, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_tokens=stop_tokens
                )
            for row, image in enumerate(chunk):
                ids = out.tokens[row, : out.lengths[row]].tolist()
                text = self.tokenizer.decode(ids)
                results.append(Result(text, ids, parse_detections(text, *image.size), out.stop_reason[row].name.lower()))
        return results

    def stream(
        self,
        image: ImageInput,
        prompt: str,
        *,
        max_new_tokens: int = 32,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_tokens: tuple[int, ...] = (),
    ) -> Iterator[str]:
        """Yields the answer's text in pieces as tokens are decoded (same tokens as `generate`)."""
        pixels, enc = self._encode([load_image(image)], [prompt], max_new_tokens)
        ids: list[int] = []
        shown = ""
        for tokens in self.generator.stream(
            self.params, pixels, enc.input_ids, enc.token_type_ids, enc.attention_mask,
            max_new_tokens=max_new_tokens, sampling=sampling_params(temperature, top_k, top_p), seed=seed,
            stop_tokens=stop_tokens,
        ):
            ids.append(int(tokens[0]))
            text = self.tokenizer.decode(ids)
            # Hold back a piece that ends inside a multi-byte character (byte-fallback pieces).
            if text.startswith(shown) and not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        if ids and (text := self.tokenizer.decode(ids)).startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]


def _download(hub_id: str) -> Path:
    """Fetches the files a model needs from the Hugging Face hub (or its local cache)."""
    import huggingface_hub
    from huggingface_hub import errors

    if hub_id.count("/") != 1:
        raise UserError(f"{hub_id} is not a local directory, and not a hub id of the form org/name")
    try:
        return Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except errors.GatedRepoError:
        raise UserError(
            f"{hub_id} is gated: accept its licence on huggingface.co, then `huggingface-cli login` or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{hub_id} was not found on the hub (or it is private: log in with HF_TOKEN)") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        raise UserError(
            f"cannot download {hub_id} ({type(e).__name__}): no network or HF_HUB_OFFLINE is set, and it is not in "
            "the local hub cache; download it once with network, or pass a local directory"
        ) from None
