"""`PaliGemma`: a loaded model (config + params + tokenizer) with its compiled entry points.

    pg = PaliGemma.from_pretrained("path/or/hub-id", dtype="float32")
    [result] = pg.generate("cat.jpg", "caption en")           # text, token_ids, boxes
    for piece in pg.stream("cat.jpg", "answer en what is this?"): print(piece, end="")
    logits = pg.forward(pixel_values, input_ids, token_type_ids, attention_mask)   # arrays
    out = pg.generate_ids(pixel_values, input_ids, attention_mask=mask)             # arrays
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pali_jax import quantize as quantization
from pali_jax import lora, sharding, weights
from pali_jax.backend import CHECKPOINT_LAYOUT, Layout, Policy
from pali_jax.beam_search import BeamSearch
from pali_jax.checkpoint import read_params, restore_params, stored_dtypes
from pali_jax.config import PaliGemmaConfig
from pali_jax.continuous import ContinuousDecoder
from pali_jax.decode import GenerateOutput, jit_model_program, refuse_records
from pali_jax.detection import Detection, parse_detections
from pali_jax.errors import UserError
from pali_jax.generate import Generator
from pali_jax.generation_config import GenerationConfig, GenerationError, check_memory, program_bytes
from pali_jax.intermediates import INTERMEDIATES, ForwardOutput, forward_output
from pali_jax.model_dir import CONFIG_FILE, PARAMS_DIR, SIDE_FILES, ModelDirError, read_model_config, read_quantization
from pali_jax.paligemma import PaliGemmaModel, abstract_params, to_layout
from pali_jax.processor import ImageInput, PaliGemmaTokenizer, load_image, numeric_array, preprocess_images, texts
from pali_jax.weights import DTYPES

if TYPE_CHECKING:
    from pali_jax.quantize import Quantization
    from pali_jax.segmentation import MaskDecoder

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
    # output_attentions / output_scores: over this row's own positions (its image tokens first, then
    # <bos>, the prompt, "\n", then the generated tokens; no padding): attentions [n, L, N, T + n - 1],
    # new token j's row being the pass that produced it (it sees positions < T + j);
    # prefill_attentions [L, N, T, T]; logprobs [n], each token's log-probability.
    attentions: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    prefill_attentions: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    logprobs: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)


def _batches(n: int, batch_size: int | None) -> list[slice]:
    """Consecutive row ranges of at most `batch_size` rows (None: one range of all n)."""
    step = batch_size or max(n, 1)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


class _TextPieces:
    """One row's streamed text: takes its tokens one by one and gives the new text each adds."""

    def __init__(self, tokenizer: PaliGemmaTokenizer, stop_tokens: set[int]):
        self.tokenizer, self.stop_tokens = tokenizer, stop_tokens
        self.ids: list[int] = []
        self.shown = ""
        self.done = False

    def add(self, token: int) -> str:
        """The text `token` adds ("" once the row has emitted a stop token: later tokens are padding)."""
        if self.done:
            return ""
        self.ids.append(token)
        self.done = token in self.stop_tokens
        text = self.tokenizer.decode(self.ids)
        # Hold back a piece that ends inside a multi-byte character (byte-fallback pieces).
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """What was held back, once the row has no more tokens."""
        return self._advance(self.tokenizer.decode(self.ids)) if self.ids else ""

    def _advance(self, text: str) -> str:
        if not text.startswith(self.shown) or len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece


def _pair(images, prompts) -> tuple[list, list[str]]:
    """One image per prompt; a single image or a single prompt is repeated to match the other."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    prompts = texts("prompts", prompts)
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(images) != len(prompts) or not prompts:
        raise UserError(f"got {len(images)} images for {len(prompts)} prompts")
    return images, prompts


@dataclasses.dataclass(frozen=True)
class Workload:
    """The `generate(images, prompts, generation_config=...)` (or `stream`) calls a process is about
    to make, one prompt per image (which images does not matter), for
    `PaliGemma.from_pretrained(compile_for=)`."""

    prompts: tuple[str, ...]
    generation_config: GenerationConfig | None = None
    stream: bool = False  # the calls are `stream(images, prompts, ...)`


@dataclasses.dataclass
class PaliGemma:
    """A PaliGemma model ready to run. `params` is a nested dict of jax arrays (`img/...`, `llm/...`)."""

    config: PaliGemmaConfig
    params: Any
    dtype: Any = jnp.float32
    path: Path | None = None  # where it was loaded from (tokenizer files live there)
    mesh: Mesh | None = None  # the mesh `params` are sharded over (pali_jax.sharding); None: one device
    layout: Layout = CHECKPOINT_LAYOUT  # how `params` holds the decoder's weights (`backend.Layout`)
    mask_decoder: "MaskDecoder | None" = None  # decodes `segment` answers' codes into `Detection.mask`
    # the platform the programs are traced for (`backend.Policy`); default: this process's backend
    policy: Policy = dataclasses.field(default_factory=Policy.host)

    def __post_init__(self):
        self.module = PaliGemmaModel(self.config, self.dtype, layout=self.layout, policy=self.policy)
        self.generator = Generator(self.module, self.mesh)
        self.beam_search = BeamSearch(self.module, self.mesh)
        self._forward = jit_model_program(self.module.apply, self.policy)
        self._forward_recorded = jit_model_program(self._forward_recorded_impl, self.policy, static_argnums=(5, 6))

    @functools.cached_property
    def tokenizer(self) -> PaliGemmaTokenizer:
        """The checkpoint's sentencepiece tokenizer (`tokenizer.model` beside the weights; beside a
        big_vision .npz also its own name, `paligemma_tokenizer.model`)."""
        names = ("tokenizer.model", "paligemma_tokenizer.model")
        found = [self.path / n for n in names if self.path is not None and (self.path / n).exists()]
        if not found:
            raise UserError(
                f"no tokenizer.model in {self.path}: text prompts need one (or use generate_ids with token ids)"
            )
        return PaliGemmaTokenizer(found[0], image_token_id=self.config.image_token_id)

    @functools.cached_property
    def continuous(self) -> ContinuousDecoder:
        """Continuous batching over slots (`pali_jax.annotate`), compiled on first use."""
        return ContinuousDecoder(self.module, self.mesh)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: str = "float32",
        *,
        sliding_window: bool = True,
        mesh: Mesh | None = None,
        layout: Layout | None = None,
        mask_decoder: "str | Path | MaskDecoder | None" = None,
        policy: Policy | None = None,
        quantize: str | Quantization | None = None,
        group_size: int | None = None,
        compile_for: Workload | None = None,
    ) -> "PaliGemma":
        """Loads a converted directory, an HF checkpoint directory (converted in memory), a
        big_vision `.npz` (read in memory, `pali_jax.weights`; its tokenizer.model is looked for
        beside it) or a hub id.

        dtype: "float32" or "bfloat16" (parameters and activations). sliding_window=False turns
        Gemma 2's sliding window off on every layer (big_vision's behaviour; see README).
        mesh (`pali_jax.sharding.make_mesh`): every parameter is loaded straight onto its shards.
        layout: how to hold the decoder's weights; None (the default) picks the fastest for
        inference on the policy's platform and dtype (`backend.Policy.inference_layout`: on every
        platform one subtree per layer; on CPU in bfloat16 projections output axes first),
        converted once here. policy: the platform the programs are for; None: this process's
        backend (`backend.Policy.host()`).
        Pass `backend.CHECKPOINT_LAYOUT` to keep the stacked checkpoint layout (what training uses).
        mask_decoder: big_vision's `vae-oid.npz` (a path, or a loaded `segmentation.MaskDecoder`):
        `generate` then fills `Detection.mask` of `segment` answers.
        quantize: "int8" (per output channel) or "int4" (groups of `group_size`, default 128, along
        the contracted axis): the projections, the embedding table and SigLIP's projections are
        quantised as they are read, one tensor at a time (`pali_jax.quantize`; docs/quantization.md).
        A directory converted with `--quantize` loads quantised without it.
        A directory holding LoRA adapters apart from its base (`lora.ADAPTERS_FILE`, written by
        `pali-jax finetune --export-adapters-apart`) loads with them merged: float weights
        (a quantised base dequantised) `W + A B`, or with `quantize` those weights quantised.
        compile_for: the `generate` (or `stream`) calls to come (`Workload`), compiled while the
        weights are read (`compile`), so that the first of them starts at once: a fresh process
        waits for the longer of the two instead of both. Its option errors are raised here.
        """
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        quant = quantization.parse(quantize, group_size)
        if isinstance(mask_decoder, (str, Path)):
            from pali_jax.segmentation import MaskDecoder

            mask_decoder = MaskDecoder.from_npz(mask_decoder)
        path = Path(path_or_hub_id).expanduser()
        if not path.exists():
            path = _download(str(path_or_hub_id))
        policy = Policy.host() if policy is None else policy
        layout = policy.inference_layout(DTYPES[dtype]) if layout is None else layout
        config, quant, read = _source(path, dtype, mesh, layout, quant)
        if not sliding_window:
            config = config.without_sliding_window()
        layout = dataclasses.replace(layout, quant=quant)
        home = path.parent if path.is_file() else path  # where tokenizer.model is looked for
        pg = cls(config, None, DTYPES[dtype], home, mesh, layout, mask_decoder, policy)
        with _compiling(pg, compile_for):
            params = read()
            stacked = "layers" in params["llm"]  # a checkpoint read per layer (weights.to_host) is not
            params = to_layout(params, dataclasses.replace(CHECKPOINT_LAYOUT, stacked=stacked, quant=quant), layout)
            if mesh is None:
                params = _to_device(params)
            else:  # the layout change keeps each slice's split: pin it to the rules of the new layout
                params = jax.device_put(params, sharding.param_shardings(params, mesh, out_first=layout.out_first))
        pg.params = params
        return pg

    def checkpoint_params(self) -> Any:
        """`params` in the checkpoint layout (stacked layers, input axes first; quantised weights
        stay quantised): what training, export and the converters use. A new tree; `params` is left
        as it is."""
        target = dataclasses.replace(CHECKPOINT_LAYOUT, quant=self.layout.quant)
        if self.layout == target:
            return self.params
        return to_layout(jax.tree.map(lambda x: x, self.params), self.layout, target)

    # -- model calls ---------------------------------------------------------------------------
    def _check(self, pixel_values, input_ids, token_type_ids=None, attention_mask=None):
        """The model inputs checked and as the programs take them: pixels [B, H, W, 3] in the model's
        dtype, ids [B, T] int32, token types and mask None or [B, T] int32 of 0 / 1."""
        pixels = numeric_array("pixel_values", pixel_values, "fiu")
        ids = numeric_array("input_ids", input_ids, "iu")
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3) or not pixels.shape[0]:
            raise UserError(f"pixel_values must be [B, {size}, {size}, 3] with B >= 1, got {list(pixels.shape)}")
        if ids.ndim != 2 or ids.shape[0] != pixels.shape[0] or not ids.shape[1]:
            raise UserError(f"input_ids must be [B, T] with B = {pixels.shape[0]}, got {list(ids.shape)}")
        counts = (ids == self.config.image_token_id).sum(axis=1)
        if (counts != self.config.num_image_tokens).any():
            raise UserError(
                f"every row needs {self.config.num_image_tokens} <image> tokens (id {self.config.image_token_id}); "
                f"got {counts.tolist()}"
            )
        # The <image> id may lie past the table (big_vision checkpoints): its positions take image features.
        # Checked before the cast to int32, which would wrap a huge id into the vocabulary.
        text_ids = np.where(ids == self.config.image_token_id, 0, ids)
        if text_ids.max() >= self.config.vocab_size or ids.min() < 0:
            raise UserError(f"input_ids must lie in [0, {self.config.vocab_size})")
        flags = []
        for name, value in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            flag = None if value is None else numeric_array(name, value, "biu")
            if flag is not None and flag.shape != ids.shape:
                raise UserError(f"{name} must be None or [B, T] = {list(ids.shape)}, got {list(flag.shape)}")
            if flag is not None and not np.isin(flag, (0, 1)).all():
                raise UserError(f"{name} must hold 0 / 1, got {flag.min()}..{flag.max()}")
            flags.append(None if flag is None else flag.astype(np.int32))
        return pixels.astype(self.dtype, copy=False), ids.astype(np.int32, copy=False), *flags

    def forward(
        self,
        pixel_values,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        *,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> jax.Array | ForwardOutput:
        """Logits [B, T, V] float32. pixel_values [B, H, W, 3] in [-1, 1]; input_ids [B, T] with the
        image tokens in place. token_type_ids None: all prefix; attention_mask None: no padding.

        With output_attentions and / or output_hidden_states: a `ForwardOutput` (logits, the
        decoder's and SigLIP's attentions and hidden states, the image features), as transformers
        returns them with the same flags; one compiled program per combination of flags.
        """
        for name, flag in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states)):
            if not isinstance(flag, (bool, np.bool_)):
                raise UserError(f"{name} must be a bool, got {flag!r}")
        pixels, ids, types, mask = self._check(pixel_values, input_ids, token_type_ids, attention_mask)
        record = bool(output_attentions or output_hidden_states)
        if record:
            program, args = self._forward_recorded, (self.params, pixels, ids, types, mask, bool(output_attentions),
                                                     bool(output_hidden_states))
        else:
            program, args = self._forward, ({"params": self.params}, pixels, ids, types, mask)
        # What XLA allocates for this very shape (the compile is the one the call then reuses).
        devices = 1 if self.mesh is None else self.mesh.devices.size
        rows = f"{ids.shape[0]} row{'s' * (ids.shape[0] != 1)} of {ids.shape[1]} tokens"
        check_memory(
            program_bytes(program, *args, resident=self.params) * devices,
            f"the forward pass ({rows}: its outputs{', recorded intermediates' * record} and XLA's temporaries)",
            "output_attentions" if output_attentions else "output_hidden_states" if record else "input_ids",
            devices=devices, task="forward",
            advice="pass fewer rows or tokens per call" + ", or ask for fewer intermediates" * record,
        )
        return program(*args)

    def _forward_recorded_impl(self, params, pixels, ids, types, mask, attentions: bool, hidden_states: bool):
        logits, recorded = self.module.apply({"params": params}, pixels, ids, types, mask, mutable=[INTERMEDIATES])
        return forward_output(logits, recorded[INTERMEDIATES], attentions=attentions, hidden_states=hidden_states)

    def generate_ids(self, pixel_values, input_ids, token_type_ids=None, attention_mask=None, *,
                     generation_config: GenerationConfig | None = None, **options: Any) -> GenerateOutput:
        """Decodes left-padded prompts given as arrays; `options` are `GenerationConfig` fields
        (max_new_tokens, temperature, top_k, top_p, beams, seed, stop_tokens, ...) overriding
        `generation_config`'s. Greedy unless a sampling option is given; beams > 1 runs beam search.

        Returns token ids [B, n], lengths [B] and why each row stopped.
        """
        generation = GenerationConfig.resolve(generation_config, options)
        generation.check_model(self.config)
        pixels, ids, types, mask = self._check(pixel_values, input_ids, token_type_ids, attention_mask)
        part = lambda x, rows: None if x is None else x[rows]  # noqa: E731
        outputs = [
            self._decode(pixels[rows], ids[rows], part(types, rows), part(mask, rows), generation)
            for rows in _batches(len(ids), generation.batch_size)
        ]
        return GenerateOutput.concatenate(outputs, self.config.pad_token_id)

    def _decode(self, pixels, ids, types, mask, generation: GenerationConfig) -> GenerateOutput:
        """One batch through beam search or the greedy / sampling decoder."""
        run = self.beam_search.search if generation.beams > 1 else self.generator.generate
        return run(self.params, pixels, ids, types, mask, generation_config=generation)

    # -- images and strings --------------------------------------------------------------------
    def _encode(self, images: Sequence[ImageInput], prompts: Sequence[str]):
        """Pixels and left-padded token ids of one batch. Prompt length against the model's
        positions is checked with the answer's length, in `decode.prepare_prompts`."""
        pixels = preprocess_images(list(images), self.config.image_size).astype(self.dtype)
        batch = self.tokenizer(list(prompts), num_image_tokens=self.config.num_image_tokens)
        return pixels, batch

    def _for_results(self, generation: GenerationConfig) -> GenerationConfig:
        """`generation`, refused where it asks for what a `Result` does not hold."""
        if generation.return_logits:
            raise GenerationError("return_logits", "return_logits needs generate_ids (Results hold no logits)")
        return generation

    def _for_stream(self, generation: GenerationConfig) -> GenerationConfig:
        """`generation`, refused where it asks for what `stream` does not do."""
        if generation.beams > 1:
            raise GenerationError("beams", "stream decodes greedily or by sampling: beams is for generate")
        refuse_records(generation, "stream decodes greedily or by sampling: {name} is for generate")
        return generation

    def _start(self, images, prompts, generation_config, options) -> tuple[GenerationConfig, list, list[str]]:
        """Options checked against the model before any image is read, then the (image, prompt) pairs."""
        generation = GenerationConfig.resolve(generation_config, options)
        generation.check_model(self.config)
        images, prompts = _pair(images, prompts)
        return generation, [load_image(image) for image in images], prompts

    def generate(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        *,
        generation_config: GenerationConfig | None = None,
        mask_decoder: "MaskDecoder | None" = None,
        **options: Any,
    ) -> list[Result]:
        """Answers each (image, prompt) pair: paths, PIL images or arrays, and prompt strings such as
        "caption en", "answer en what is on the table?" or "detect cat ; dog".

        `options` are `GenerationConfig` fields (max_new_tokens, temperature, top_k, top_p, beams,
        length_penalty, seed, stop_tokens, cache_length, batch_size) overriding `generation_config`'s.
        Greedy unless a sampling option is given; `beams` > 1 runs beam search. A single image or
        prompt is paired with every one of the others. `batch_size` splits the work into batches.
        `mask_decoder` (default: the one given to `from_pretrained`) decodes the `<seg>` codes of
        `segment` answers into `Detection.mask`, all of a batch in one call.
        """
        generation, loaded, prompts = self._start(images, prompts, generation_config, options)
        self._for_results(generation)
        results = []
        for rows in _batches(len(prompts), generation.batch_size):
            pixels, enc = self._encode(loaded[rows], prompts[rows])
            out = self._decode(pixels, enc.input_ids, enc.token_type_ids, enc.attention_mask, generation)
            for row, image in enumerate(loaded[rows]):
                ids = out.row_tokens(row)
                text = self.tokenizer.decode(ids)
                results.append(Result(text, ids, parse_detections(text, *image.size), out.stop_reason[row].name.lower(),
                                      **out.row_records(row)))
            results[rows] = _add_masks(results[rows], loaded[rows], mask_decoder or self.mask_decoder, prompts[rows])
        return results

    def compile(self, prompts: str | Sequence[str], *, stream: bool = False,
                generation_config: GenerationConfig | None = None, **options: Any) -> None:
        """Compiles the programs `generate(images, prompts, ...)` runs (with `stream`: those of
        `stream(images, prompts, ...)`), for any images (one per prompt), without running them.
        Works on `params` as arrays or as their abstract tree (`jax.ShapeDtypeStruct`s, as
        `from_pretrained(compile_for=)` holds while reading). The mask decoder compiles on first use."""
        generation = GenerationConfig.resolve(generation_config, options)
        generation = self._for_stream(generation) if stream else self._for_results(generation)
        generation.check_model(self.config)
        prompts = texts("prompts", prompts)
        if not prompts:
            raise UserError("no prompts to compile for: give one prompt per image")
        size = self.config.image_size
        if generation.beams > 1:
            run = self.beam_search.compile
        else:
            run = functools.partial(self.generator.compile, stream=stream)
        done = set()  # the [B, T] shapes compiled: the same shape is the same program
        for rows in _batches(len(prompts), generation.batch_size):
            batch = self.tokenizer(prompts[rows], num_image_tokens=self.config.num_image_tokens)
            if np.shape(batch.input_ids) in done:
                continue
            done.add(np.shape(batch.input_ids))
            pixels = jax.ShapeDtypeStruct((len(batch.input_ids), size, size, 3), self.dtype)
            run(self.params, pixels, batch.input_ids, batch.token_type_ids, batch.attention_mask,
                generation_config=generation)

    def stream(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: str | Sequence[str],
        *,
        generation_config: GenerationConfig | None = None,
        **options: Any,
    ) -> Iterator[str] | Iterator[list[str]]:
        """Yields the answers' text in pieces as tokens are decoded (the tokens of `generate`).

        One image and one prompt string: plain str pieces. A list of images or of prompts (paired
        as in `generate`): one `list[str]` per decode step, a piece per row, "" for a row with
        nothing new (held back inside a multi-byte character, finished, or in a later batch:
        `batch_size` streams the batches one after another). Options as in `generate` (greedy or
        sampled only); they are checked when `stream` is called, not at the first `next`.
        """
        single = isinstance(prompts, str) and not isinstance(images, (list, tuple))
        generation, loaded, prompts = self._start(images, prompts, generation_config, options)
        self._for_stream(generation)
        steps = []  # every batch's decoder, created (and so checked) now; each runs when reached
        for rows in _batches(len(prompts), generation.batch_size):
            pixels, enc = self._encode(loaded[rows], prompts[rows])
            tokens = self.generator.stream(
                self.params, pixels, enc.input_ids, enc.token_type_ids, enc.attention_mask, generation_config=generation
            )
            steps.append((rows, tokens))
        pieces = self._stream_pieces(steps, len(prompts), generation)
        return (step[0] for step in pieces if step[0]) if single else pieces

    def _stream_pieces(self, steps, n: int, generation: GenerationConfig) -> Iterator[list[str]]:
        stop_tokens = set(self.config.eos_token_ids) | set(generation.stop_tokens)
        for rows, tokens in steps:
            texts = [_TextPieces(self.tokenizer, stop_tokens) for _ in range(rows.start, rows.stop)]
            for step_tokens in tokens:
                pieces = [""] * n
                for row, (text, token) in enumerate(zip(texts, step_tokens), start=rows.start):
                    pieces[row] = text.add(int(token))
                yield pieces
            tail = [""] * n
            for row, text in enumerate(texts, start=rows.start):
                tail[row] = text.flush()
            if any(tail):
                yield tail


_warned_no_masks = False


def _add_masks(results: list[Result], images: list, decoder: "MaskDecoder | None", prompts: list[str]) -> list[Result]:
    """The results with `Detection.mask` of their segmentation boxes filled (one decoder call for
    all), or, without a decoder, as they are, with a warning once per process saying how to get masks."""
    global _warned_no_masks
    if decoder is None:
        coded = any(d.seg_codes is not None for res in results for d in res.boxes)
        if not _warned_no_masks and (coded or any(p.lstrip().startswith("segment") for p in prompts)):
            _warned_no_masks = True
            warnings.warn("segment answers carry 16 <seg> codes per box, not masks: pass mask_decoder= (CLI: "
                          "--seg-vae PATH or PALI_JAX_SEG_VAE) with big_vision's vae-oid.npz to decode them (see README)")
        return results
    boxes = decoder.add_masks([res.boxes for res in results], [image.size for image in images])
    return [dataclasses.replace(res, boxes=b) for res, b in zip(results, boxes)]


def _to_device(tree: dict) -> dict:
    """`tree` (nested dicts) with its arrays on the default device, moved in place one at a time:
    each host array is dropped once its copy is made, so memory never holds the host tree and the
    device tree whole (a 64-byte-aligned host array is not copied at all on CPU)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _to_device(value)
        else:
            tree[key] = jax.device_put(value).block_until_ready()  # copied before the next one starts
    return tree


def _source(path: Path, dtype: str, mesh: Mesh | None, layout: Layout, quant: Quantization | None
            ) -> tuple[PaliGemmaConfig, Quantization | None, Callable[[], dict]]:
    """What `from_pretrained` loads from `path`: (config, the quantisation the params will hold, a
    reader of the params in the checkpoint layout). Only the config is read here."""
    if (path / CONFIG_FILE).exists():
        config = read_model_config(path)
        stored = read_quantization(path)
        if (path / lora.ADAPTERS_FILE).exists():
            def read_merged() -> dict:
                params = _read_with_adapters(path, config, DTYPES[dtype], stored, quant)
                return params if mesh is None else jax.device_put(params, sharding.param_shardings(params, mesh))

            return config, quant, read_merged
        if stored is not None and quant is not None and quant != stored:
            raise quantization.QuantizationError(
                f"{path} is already quantized ({stored.scheme}): load it without quantize=, or quantize its source"
            )
        held = stored if stored is not None else quant
        return config, held, lambda: _read_dir(path, config, DTYPES[dtype], mesh, stored, held)
    if (path.is_file() and path.suffix == ".npz") or (path / "config.json").exists():
        # host arrays, the decoder's layers apart where the layout keeps them apart: moved into the
        # layout one layer at a time, then onto the device one array at a time
        plan = weights.plan(path, dtype)
        if mesh is None:
            return plan.config, quant, lambda: weights.to_host(plan, quant, per_layer=not layout.stacked)
        return plan.config, quant, lambda: weights.to_mesh(plan, mesh, None, quant)
    raise UserError(f"{path} is neither a pali-jax directory ({CONFIG_FILE}) nor an HF checkpoint (config.json)")


def _read_dir(path: Path, config: PaliGemmaConfig, dtype, mesh: Mesh | None, stored: Quantization | None,
              quant: Quantization | None) -> Any:
    """The params of a converted directory in the checkpoint layout, quantised as `quant` says:
    as stored, or a float directory quantised leaf by leaf as it is read."""
    if quant == stored:
        abstract = abstract_params(config, dtype, dataclasses.replace(CHECKPOINT_LAYOUT, quant=quant))
        if mesh is not None:
            return restore_params(path / PARAMS_DIR, sharding.placed_abstract(abstract, mesh))
        # host arrays: split below as views, then made device arrays (in place on CPU)
        return read_params(path / PARAMS_DIR, abstract)
    # A float directory read in its stored dtypes (memory-mapped: nothing float is held whole), each
    # weight quantised from the stored values, the other leaves cast to `dtype`.
    target = abstract_params(config, dtype, dataclasses.replace(CHECKPOINT_LAYOUT, quant=quant))
    host = read_params(path / PARAMS_DIR, stored_dtypes(path / PARAMS_DIR, abstract_params(config)))
    params = quantization.quantize_params(host, target, cast=dtype)
    if mesh is not None:
        params = jax.device_put(params, sharding.param_shardings(params, mesh))
    return params


@contextlib.contextmanager
def _compiling(pg: PaliGemma, workload: Workload | None) -> Iterator[None]:
    """Runs `pg.compile` for `workload` on another thread while the body reads the weights (XLA
    compiles with the GIL released, so the two overlap), `pg.params` standing for them meanwhile
    as the abstract tree they will fill. An error of the body is raised once the compile thread
    has ended; a compile error once the body is done."""
    if workload is None:
        yield
        return
    abstract = abstract_params(pg.config, pg.dtype, pg.layout)
    if pg.mesh is not None:
        abstract = sharding.placed_abstract(abstract, pg.mesh, out_first=pg.layout.out_first)
    pg.params = abstract
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pali-jax-compile") as pool:
        compiled = pool.submit(pg.compile, workload.prompts, stream=workload.stream,
                               generation_config=workload.generation_config)
        yield
        compiled.result()


def _read_with_adapters(path: Path, config: PaliGemmaConfig, dtype, stored: Quantization | None,
                        quant: Quantization | None) -> Any:
    """A converted directory's base (quantised as `stored`) with its LoRA adapters merged, on the
    host in the checkpoint layout: float (`dtype`), or quantised as `quant` asks. The merge runs
    in float32, so memory holds the float32 model while it loads."""
    base = read_params(path / PARAMS_DIR, abstract_params(config, jnp.float32,
                                                          dataclasses.replace(CHECKPOINT_LAYOUT, quant=stored)))
    file = path / lora.ADAPTERS_FILE
    try:
        adapters = lora.load(file)
    except (OSError, ValueError, KeyError) as e:
        raise ModelDirError(f"cannot read {file}: {e}") from None
    model = PaliGemmaModel(config, layout=dataclasses.replace(CHECKPOINT_LAYOUT, quant=stored))
    try:
        merged = quantization.dequantize_params(lora.merge(model, base, adapters))
    except (KeyError, TypeError, ValueError):
        raise ModelDirError(f"{file} does not fit the model in {path}: it holds another model's adapters") from None
    if quant is None:
        return jax.tree.map(lambda x: np.asarray(x, dtype), merged)
    target = abstract_params(config, dtype, dataclasses.replace(CHECKPOINT_LAYOUT, quant=quant))
    return quantization.quantize_params(merged, target, cast=dtype)


def _download(hub_id: str) -> Path:
    """Fetches the files a model needs from the Hugging Face hub (or its local cache)."""
    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.utils import validate_repo_id

    if hub_id.count("/") != 1 or hub_id.startswith(("/", ".", "~")):
        raise UserError(f"{hub_id} is not a local directory, and not a hub id of the form org/name")
    try:
        validate_repo_id(hub_id)
    except errors.HFValidationError:
        raise UserError(f"{hub_id} is not a local directory, and not a valid hub id") from None
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
