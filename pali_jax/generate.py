"""Generation: one jitted program runs SigLIP, the prefill and a `lax.while_loop` decode.

The decode state (`DecodeState`) is an explicit pytree: step, output buffer, KV cache, RNG key,
per-row `done` flags. The loop stops when every row is done (an EOS / stop token), when
`max_new_tokens` tokens were emitted, or when the cache has no free slot (it never writes past
it; `stop_reason` says which). `max_new_tokens`, the sampling parameters, the seed and the stop
tokens are traced values: changing them does not recompile.

Shape buckets keep the number of compiled programs small:
  * prompt length: the text part (everything after the image tokens, padding included) is
    left-padded to the next power of two >= 16, so prompts of 1..200 text tokens use 5 programs
    (16, 32, 64, 128, 256);
  * the output buffer holds the next power of two >= max(max_new_tokens, 32) tokens;
  * the cache has prompt bucket + buffer slots unless `cache_length` says otherwise.

`stream` runs the same prefill and the same loop body, one jitted step per host iteration, and
yields each step's tokens: it gives exactly the tokens of `generate`.

`output_attentions` / `output_scores` (and `return_logits`) are static: each combination is a
program of its own, carrying its extra buffers in the decode state; with all of them off the
program is the plain one, with no extra output.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pali_jax import backend, sharding
from pali_jax.config import PaliGemmaConfig
from pali_jax.errors import UserError
from pali_jax.generation_config import GenerationConfig, GenerationError, check_memory
from pali_jax.intermediates import apply_recording
from pali_jax.kv_cache import KVCache
from pali_jax.paligemma import PaliGemmaModel
from pali_jax.sampling import sample

MIN_TEXT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 32
DEFAULT_COMPILATION_CACHE = Path("~/.cache/pali_jax/xla").expanduser()


class StopReason(enum.IntEnum):
    STOP_TOKEN = 0  # EOS or a user stop token was emitted (and is part of the output)
    MAX_NEW_TOKENS = 1
    CACHE_FULL = 2


def bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


_cache_warned = False


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache (default ~/.cache/pali_jax/xla); returns its
    directory, or None when the default one cannot be used.

    The directory is created private (mode 0700): XLA loads executables from it, so a directory
    that others can write is refused (`UserError`). When the default directory cannot be created
    or written (a read-only HOME), a warning is printed once and the run goes on uncached; an
    explicit `path` that cannot be used is an error.
    """
    global _cache_warned
    explicit = bool(path)
    path = Path(path).expanduser() if path else DEFAULT_COMPILATION_CACHE
    try:
        if not path.exists():
            path.mkdir(parents=True, mode=0o700)
            path.chmod(0o700)  # mkdir's mode is cut by the umask, never widened; be exact
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as e:
        reason = f"{e.strerror or e}: {path}"
        if explicit:
            raise UserError(f"cannot use the compilation cache directory ({reason})") from None
        if not _cache_warned:
            print(f"warning: cannot use the compilation cache ({reason}); running without it "
                  "(--compilation-cache DIR picks another directory)", file=sys.stderr)
            _cache_warned = True
        return None
    info = path.stat()
    if info.st_mode & 0o022 or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise UserError(
            f"the compilation cache {path} is writable by other users or owned by another user: XLA would load "
            f"programs they put there; use a private directory (chmod 700 {path}) or --no-compilation-cache"
        )
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def jit_model_program(fun: Callable, policy: backend.Policy, **jit_kwargs: Any) -> Callable:
    """`jax.jit` for every program that runs the model for inference (generation, beam search,
    forward), with the compiler options of the platform it is for (`backend.Policy.compiler_options`)."""
    return jax.jit(fun, compiler_options=policy.compiler_options(), **jit_kwargs)


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # [] int32: tokens emitted so far
    tokens: jax.Array  # [B, N] int32: emitted tokens, pad after a row's stop token
    lengths: jax.Array  # [B] int32: tokens emitted per row (its stop token included)
    done: jax.Array  # [B] bool
    cache: KVCache
    key: jax.Array
    logits: jax.Array | None  # [B, N, V] float32 when asked for (tests, scoring), else None
    # output_attentions: per emitted token, the attention of the pass that produced it (its last
    # query row) [B, N, L, Nh, S], and the prefill's whole [B, L, Nh, T, S]; output_scores: each
    # emitted token's log-probability [B, N]. Otherwise None, and the program is the plain one.
    attentions: jax.Array | None = None
    prefill_attentions: jax.Array | None = None
    logprobs: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Host-side result: `tokens` [B, n] (n = longest row; pad after each row's end)."""

    tokens: np.ndarray
    lengths: np.ndarray
    stop_reason: list[StopReason]
    logits: np.ndarray | None = None  # [B, n, V] per-step logits, when asked for
    scores: np.ndarray | None = None  # [B] beam search: length-normalised log-probability
    # output_attentions (see DecodeState): [B, n, L, N, S] and [B, L, N, T, S] over the S cache
    # slots, where row b's prompt starts at slot prompt_start[b] (left padding before it) and its
    # j-th new token sits at slot T + j; output_scores: log-probabilities [B, n] (0 past a row's end).
    attentions: np.ndarray | None = None
    prefill_attentions: np.ndarray | None = None
    prompt_start: np.ndarray | None = None
    logprobs: np.ndarray | None = None


def stop_reasons(done, lengths, max_new_tokens: int) -> list[StopReason]:
    return [
        StopReason.STOP_TOKEN if d else StopReason.MAX_NEW_TOKENS if n >= max_new_tokens else StopReason.CACHE_FULL
        for d, n in zip(np.asarray(done), np.asarray(lengths))
    ]


def prefill(
    model: PaliGemmaModel, mesh: Mesh | None, cache_length: int, params, pixels, ids, types, mask, *, record=False
):
    """Traced: image + prompts into a fresh cache of `cache_length` slots; (last logits [B, V], cache,
    the decoder's attention probabilities [L, B, N, T, S] if `record` else None)."""
    cache = KVCache.init(model.cfg.text, ids.shape[0], cache_length, model.dtype, model.layout.stacked)
    if mesh is not None:  # host inputs and the fresh cache carry no sharding: pin them
        pixels, ids, types, mask = sharding.constrain_batch((pixels, ids, types, mask), mesh)
        cache = sharding.constrain_cache(cache, mesh)
    (logits, cache), attentions = apply_recording(
        model, {"params": params}, pixels, ids, types, mask, cache, method=PaliGemmaModel.prefill, record=record
    )
    return logits, cache, attentions


@dataclasses.dataclass(frozen=True)
class _Statics:
    buffer: int  # N
    cache_length: int  # S
    keep_logits: bool
    attentions: bool = False
    scores: bool = False


@functools.lru_cache(maxsize=64)  # eval_shape traces the cache's init: once per shape, not per call
def decode_bytes(
    cfg: PaliGemmaConfig, rows: int, cache_length: int, buffer: int, dtype, keep_logits: bool,
    attentions_of_prompt: int = 0, scores: bool = False,
) -> int:
    """Bytes of a decode's KV cache and output buffers for `rows` rows, from their shapes alone
    (`jax.eval_shape`: nothing is allocated). A lower bound: temporaries are not counted.

    attentions_of_prompt: the prompt length T when attentions are recorded (0: not recorded): the
    prefill's [L, N, T, S] and one [L, N, S] per new token, float32, per row."""
    cache = jax.eval_shape(lambda: KVCache.init(cfg.text, rows, cache_length, dtype))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
    total += rows * buffer * 4 * (2 if scores else 1)  # int32 tokens, float32 log-probabilities
    if keep_logits:
        total += rows * buffer * cfg.vocab_size * 4
    if attentions_of_prompt:
        total += rows * cfg.text.depth * cfg.text.num_heads * cache_length * (attentions_of_prompt + buffer) * 4
    return total


def prepare_prompts(
    cfg: PaliGemmaConfig, ids, types, mask, generation: GenerationConfig, *, dtype=jnp.float32,
    mesh: Mesh | None = None,
) -> tuple[_Statics, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host-side checks and bucketing, all before anything is allocated or compiled: checks the
    options against the model (positions, vocabulary) and the machine (cache and buffers against
    free memory), left-pads prompts to their bucket, sizes buffer and cache, and packs the stop
    tokens into a fixed-size array (fixed shape: no recompile)."""
    generation.check_model(cfg)
    ids = np.asarray(ids, np.int32)
    length = ids.shape[1]
    types = np.zeros_like(ids) if types is None else np.asarray(types, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    if not mask[:, -1].all():
        raise UserError("prompts must be left-padded: the last position of every row must be a real token")
    generation.check_prompt_length(cfg, int(mask.sum(axis=1).max()))
    padded = cfg.num_image_tokens + bucket(max(length - cfg.num_image_tokens, 1), MIN_TEXT_BUCKET)
    extra = padded - length
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=cfg.pad_token_id)
    types, mask = np.pad(types, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))
    buffer = bucket(generation.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    statics = _Statics(
        buffer, generation.cache_length or padded + buffer, generation.return_logits, generation.output_attentions,
        generation.output_scores,
    )
    if statics.cache_length <= padded:
        raise GenerationError(
            "cache_length", f"cache_length {statics.cache_length} leaves no room after a {padded}-token prompt"
        )
    rows = ids.shape[0] * generation.beams
    need = decode_bytes(cfg, rows, statics.cache_length, buffer, dtype, statics.keep_logits,
                        padded if statics.attentions else 0, statics.scores)
    check_memory(
        need, f"the KV cache and output buffers ({rows} row{'s' * (rows != 1)}, {statics.cache_length} cache slots)",
        "output_attentions" if statics.attentions else "cache_length" if generation.cache_length else "max_new_tokens",
        devices=1 if mesh is None else mesh.devices.size,
        device=None if mesh is None else mesh.devices.flat[0],
    )
    stops = sorted(set(cfg.eos_token_ids) | set(generation.stop_tokens))
    stops = np.array(stops + [-1] * (bucket(len(stops), 8) - len(stops)), np.int32)
    return statics, ids, types, mask, stops


class Generator:
    """Compiled generation for one model. Reuse one instance: it holds the compiled programs."""

    def __init__(self, model: PaliGemmaModel, mesh: Mesh | None = None):
        self.model = model
        self.mesh = mesh  # params placed by pali_jax.sharding on this mesh; None: one device
        self.traces = 0  # how many programs were traced (each trace is a compile)
        self._generate = jit_model_program(self._generate_impl, model.policy, static_argnums=0)
        self._prefill = jit_model_program(self._prefill_impl, model.policy, static_argnums=0)
        self._step = jit_model_program(self._step_impl, model.policy, donate_argnums=1)

    # -- traced pieces -------------------------------------------------------------------------
    def _emit(self, state: DecodeState, token, logits, stop_tokens, attention=None) -> DecodeState:
        """Writes this step's token [B] (and what is recorded: logits [B, V], the attention of its
        last query [L, B, N, 1, S]) at `step`."""
        pad = self.model.cfg.pad_token_id
        token = jnp.where(state.done, pad, token).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
        at_step = lambda buffer, value: jax.lax.dynamic_update_index_in_dim(buffer, value, state.step, 1)  # noqa: E731
        if state.logits is not None:
            state = state.replace(logits=at_step(state.logits, logits))
        if state.logprobs is not None:
            chosen = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
            state = state.replace(logprobs=at_step(state.logprobs, jnp.where(state.done, 0.0, chosen)))
        if state.attentions is not None:
            rows = jnp.moveaxis(attention[:, :, :, -1], 0, 1)  # [B, L, N, S]
            state = state.replace(attentions=at_step(state.attentions, jnp.where(state.done[:, None, None, None], 0.0, rows)))
        stopped = jnp.isin(token, stop_tokens) & ~state.done
        return self._host_readable(state.replace(
            step=state.step + 1, tokens=tokens, lengths=state.lengths + (~state.done), done=state.done | stopped
        ))

    def _host_readable(self, state: DecodeState) -> DecodeState:
        """Under a mesh, the outputs the host reads made whole on every device: in a multi-host run
        a process can only fetch arrays its own devices hold entirely."""
        if self.mesh is None:
            return state
        outputs = {
            k: getattr(state, k)
            for k in ("tokens", "lengths", "done", "logits", "attentions", "prefill_attentions", "logprobs")
        }
        return state.replace(**sharding.replicate(outputs, self.mesh))

    def _prefill_impl(self, statics: _Statics, params, pixels, ids, types, mask, sampling, key, stop_tokens):
        self.traces += 1
        cfg = self.model.cfg
        batch = ids.shape[0]
        logits, cache, attention = prefill(
            self.model, self.mesh, statics.cache_length, params, pixels, ids, types, mask, record=statics.attentions
        )
        depth, heads = cfg.text.depth, cfg.text.num_heads
        state = DecodeState(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch, statics.buffer), cfg.pad_token_id, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            done=jnp.zeros((batch,), bool),
            cache=cache,
            key=key,
            logits=jnp.zeros((batch, statics.buffer, cfg.vocab_size), jnp.float32) if statics.keep_logits else None,
            attentions=jnp.zeros((batch, statics.buffer, depth, heads, statics.cache_length), jnp.float32)
            if statics.attentions else None,
            prefill_attentions=None if attention is None else jnp.moveaxis(attention, 0, 1),
            logprobs=jnp.zeros((batch, statics.buffer), jnp.float32) if statics.scores else None,
        )
        token = sample(logits, jax.random.fold_in(key, 0), sampling)
        return self._emit(state, token, logits, stop_tokens, attention)

    def _step_impl(self, params, state: DecodeState, sampling, stop_tokens) -> DecodeState:
        prev = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)  # [B, 1]
        (logits, cache), attention = apply_recording(
            self.model, {"params": params}, prev, state.cache, ~state.done[:, None], method=PaliGemmaModel.step,
            record=state.attentions is not None,
        )
        if self.mesh is not None:  # keeps the while loop's carried cache in its layout
            cache = sharding.constrain_cache(cache, self.mesh)
        token = sample(logits[:, 0], jax.random.fold_in(state.key, state.step), sampling)
        return self._emit(state.replace(cache=cache), token, logits[:, 0], stop_tokens, attention)

    @staticmethod
    def _running(state: DecodeState, max_new_tokens) -> jax.Array:
        return (state.step < max_new_tokens) & ~state.done.all() & (state.cache.index < state.cache.length)

    def _generate_impl(self, statics, params, pixels, ids, types, mask, max_new_tokens, sampling, key, stop_tokens):
        state = self._prefill_impl(statics, params, pixels, ids, types, mask, sampling, key, stop_tokens)
        # The loop's carried state takes whatever layout XLA picks: make the result readable again.
        return self._host_readable(jax.lax.while_loop(
            lambda s: self._running(s, max_new_tokens),
            lambda s: self._step_impl(params, s, sampling, stop_tokens),
            state,
        ))

    # -- host API ------------------------------------------------------------------------------
    def _prepare(self, input_ids, token_type_ids, attention_mask, generation_config, options):
        generation = GenerationConfig.resolve(generation_config, options)
        if generation.beams > 1:
            raise GenerationError(
                "beams", f"Generator decodes greedily or by sampling: beams={generation.beams} needs BeamSearch"
            )
        prepared = prepare_prompts(
            self.model.cfg, input_ids, token_type_ids, attention_mask, generation, dtype=self.model.dtype,
            mesh=self.mesh,
        )
        return generation, prepared

    def generate(
        self,
        params,
        pixel_values,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        *,
        generation_config: GenerationConfig | None = None,
        **options: Any,
    ) -> GenerateOutput:
        """Decodes a batch of left-padded prompts; see the module docstring. `options` are
        `GenerationConfig` fields overriding `generation_config`'s (`beams` must stay 1 here)."""
        generation, (statics, ids, types, mask, stops) = self._prepare(
            input_ids, token_type_ids, attention_mask, generation_config, options
        )
        state = self._generate(
            statics, params, pixel_values, ids, types, mask, jnp.int32(generation.max_new_tokens),
            generation.sampling_params(), generation.prng_key(), stops,
        )
        return self._output(state, generation.max_new_tokens, mask)

    def stream(
        self,
        params,
        pixel_values,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        *,
        generation_config: GenerationConfig | None = None,
        **options: Any,
    ) -> Iterator[np.ndarray]:
        """Yields each step's tokens [B] (pad for rows already done) as they are decoded.

        The options are checked now, before the iterator is returned; decoding starts at its
        first `next`."""
        generation, (statics, ids, types, mask, stops) = self._prepare(
            input_ids, token_type_ids, attention_mask, generation_config, options
        )
        if generation.records:
            name = generation.records[0]
            raise GenerationError(name, f"stream yields tokens only: {name} is for generate")
        return self._stream_steps(statics, params, pixel_values, ids, types, mask, stops, generation)

    def _stream_steps(self, statics, params, pixels, ids, types, mask, stops, generation: GenerationConfig):
        sampling = generation.sampling_params()
        state = self._prefill(statics, params, pixels, ids, types, mask, sampling, generation.prng_key(), stops)
        limit = jnp.int32(generation.max_new_tokens)
        while True:
            step = int(state.step)
            yield np.asarray(state.tokens[:, step - 1])
            if not bool(self._running(state, limit)):
                return
            state = self._step(params, state, sampling, stops)

    def _output(self, state: DecodeState, max_new_tokens: int, mask: np.ndarray) -> GenerateOutput:
        """The host copy, cut to the longest row; mask: the prompts' bucketed attention mask."""
        lengths = np.asarray(state.lengths)
        n = int(lengths.max())
        cut = lambda x: None if x is None else np.asarray(x[:, :n])  # noqa: E731
        recorded = state.attentions is not None
        return GenerateOutput(
            np.asarray(state.tokens[:, :n]), lengths, stop_reasons(state.done, lengths, max_new_tokens),
            cut(state.logits), attentions=cut(state.attentions),
            prefill_attentions=None if not recorded else np.asarray(state.prefill_attentions),
            prompt_start=None if not recorded else np.argmax(mask, axis=1), logprobs=cut(state.logprobs),
        )
