"""Generation in fixed batches: one jitted program runs SigLIP, the prefill and a `lax.while_loop`
decode (`Generator.generate`), or the same prefill and loop body one jitted step per host iteration
(`Generator.stream`, which gives exactly the tokens of `generate`). The model, the buckets, the
stop tokens and the loop's test come from the decode core (`pali_jax.decode`).

The decode state (`DecodeState`) is an explicit pytree: step, output buffer, KV cache, RNG key,
per-row `done` flags. The loop stops when every row is done (an EOS / stop token), when
`max_new_tokens` tokens were emitted, or when the cache has no free slot (it never writes past
it; `stop_reason` says which). `max_new_tokens`, the sampling parameters, the seed and the stop
tokens are traced values: changing them does not recompile.

`output_attentions` / `output_scores` (and `return_logits`) are static: each combination is a
program of its own, carrying its extra buffers in the decode state; with all of them off the
program is the plain one, with no extra output.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pali_jax import decode
from pali_jax.decode import DecodeStatics, GenerateOutput, jit_model_program
from pali_jax.errors import UserError
from pali_jax.generation_config import GenerationConfig, GenerationError
from pali_jax.kv_cache import KVCache
from pali_jax.paligemma import PaliGemmaModel
from pali_jax.sampling import sample

DEFAULT_COMPILATION_CACHE = Path("~/.cache/pali_jax/xla").expanduser()

_cache_warned = False


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache (default ~/.cache/pali_jax/xla); returns its
    directory, or None when the default one cannot be used.

    The directory is created private (mode 0700): XLA loads executables from it, so a directory
    that others can write is refused (`UserError`). When the default directory cannot be created
    or written (a read-only HOME), a warning is issued once (`warnings.warn`) and the run goes on
    uncached; an explicit `path` that cannot be used is an error.
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
            warnings.warn(f"cannot use the compilation cache ({reason}); running without it "
                          "(--compilation-cache DIR picks another directory)")
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


class _PrefillArguments(NamedTuple):
    """`Generator._prefill`'s arguments, in its order; `stream` and `compile` also read fields."""

    statics: Any
    params: Any
    pixel_values: Any
    input_ids: Any
    token_type_ids: Any
    attention_mask: Any
    sampling: Any
    key: Any
    stops: Any


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
        return decode.placed(state.replace(
            step=state.step + 1, tokens=tokens, lengths=state.lengths + (~state.done), done=state.done | stopped
        ), self.mesh)

    def _prefill_impl(self, statics: DecodeStatics, params, pixels, ids, types, mask, sampling, key, stop_tokens):
        self.traces += 1
        cfg = self.model.cfg
        batch = ids.shape[0]
        logits, cache, attention = decode.prefill(
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
        last = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1, keepdims=False)  # [B]
        logits, cache, attention = decode.step(
            self.model, params, last, state.cache, ~state.done, record=state.attentions is not None
        )
        token = sample(logits, jax.random.fold_in(state.key, state.step), sampling)
        return self._emit(state.replace(cache=cache), token, logits, stop_tokens, attention)

    def _generate_impl(self, statics, params, pixels, ids, types, mask, max_new_tokens, sampling, key, stop_tokens):
        state = self._prefill_impl(statics, params, pixels, ids, types, mask, sampling, key, stop_tokens)
        # The loop's carried state takes whatever layout XLA picks: make the result readable again.
        return decode.placed(jax.lax.while_loop(
            lambda s: decode.running(s.step, max_new_tokens, s.done, s.cache),
            lambda s: self._step_impl(params, s, sampling, stop_tokens),
            state,
        ), self.mesh)

    # -- host API ------------------------------------------------------------------------------
    def _prepare(self, input_ids, token_type_ids, attention_mask, generation_config, options):
        generation = GenerationConfig.resolve(generation_config, options)
        if generation.beams > 1:
            raise GenerationError(
                "beams", f"Generator decodes greedily or by sampling: beams={generation.beams} needs BeamSearch"
            )
        prepared = decode.prepare_prompts(
            self.model.cfg, input_ids, token_type_ids, attention_mask, generation, dtype=self.model.dtype,
            mesh=self.mesh,
        )
        return generation, prepared

    def _generate_arguments(self, params, pixel_values, input_ids, token_type_ids, attention_mask,
                            generation_config, options) -> tuple[GenerationConfig, np.ndarray, tuple]:
        """(options resolved, the bucketed attention mask, `_generate`'s arguments)."""
        generation, (statics, ids, types, mask, stops) = self._prepare(
            input_ids, token_type_ids, attention_mask, generation_config, options
        )
        return generation, mask, (
            statics, params, pixel_values, ids, types, mask, jnp.int32(generation.max_new_tokens),
            generation.sampling_params(), generation.prng_key(), stops,
        )

    def generate(self, params, pixel_values, input_ids, token_type_ids=None, attention_mask=None, *,
                 generation_config: GenerationConfig | None = None, **options: Any) -> GenerateOutput:
        """Decodes a batch of left-padded prompts; see the module docstring. `options` are
        `GenerationConfig` fields overriding `generation_config`'s (`beams` must stay 1 here)."""
        generation, mask, arguments = self._generate_arguments(
            params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config, options
        )
        return self._output(self._generate(*arguments), generation.max_new_tokens, mask)

    def compile(self, params, pixel_values, input_ids, token_type_ids=None, attention_mask=None, *,
                stream: bool = False, generation_config: GenerationConfig | None = None, **options: Any) -> None:
        """Compiles the programs `generate` (or with `stream`, `stream`: its prefill and its step)
        runs for these arguments, without running them. Only the shapes and dtypes of `params` and
        `pixel_values` count: they may be `jax.ShapeDtypeStruct`s (placed as the arrays the call
        will get), so this can run while the weights load."""
        if not stream:
            _, _, arguments = self._generate_arguments(
                params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config, options
            )
            self._generate.lower(*arguments).compile()
            return
        _, arguments = self._stream_arguments(
            params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config, options
        )
        prefill = self._prefill.lower(*arguments)
        prefill.compile()
        # the step on the state as the prefill returns it
        self._step.lower(arguments.params, prefill.out_info, arguments.sampling, arguments.stops).compile()

    def _stream_arguments(self, params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config,
                          options) -> tuple[GenerationConfig, "_PrefillArguments"]:
        """(options resolved and checked, `_prefill`'s arguments)."""
        generation, (statics, ids, types, mask, stops) = self._prepare(
            input_ids, token_type_ids, attention_mask, generation_config, options
        )
        decode.refuse_records(generation, "stream yields tokens only: {name} is for generate")
        return generation, _PrefillArguments(
            statics, params, pixel_values, ids, types, mask, generation.sampling_params(), generation.prng_key(), stops
        )

    def stream(self, params, pixel_values, input_ids, token_type_ids=None, attention_mask=None, *,
               generation_config: GenerationConfig | None = None, **options: Any) -> Iterator[np.ndarray]:
        """Yields each step's tokens [B] (pad for rows already done) as they are decoded.

        The options are checked now, before the iterator is returned; decoding starts at its
        first `next`."""
        generation, arguments = self._stream_arguments(
            params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config, options
        )
        return self._stream_steps(arguments, jnp.int32(generation.max_new_tokens))

    def _stream_steps(self, arguments: "_PrefillArguments", limit: jax.Array) -> Iterator[np.ndarray]:
        state = self._prefill(*arguments)
        while True:
            step = int(state.step)
            yield np.asarray(state.tokens[:, step - 1])
            if not bool(decode.running(state.step, limit, state.done, state.cache)):
                return
            state = self._step(arguments.params, state, arguments.sampling, arguments.stops)

    def _output(self, state: DecodeState, max_new_tokens: int, mask: np.ndarray) -> GenerateOutput:
        """The host copy, cut to the longest row; mask: the prompts' bucketed attention mask."""
        lengths = np.asarray(state.lengths)
        n = int(lengths.max())
        cut = lambda x: None if x is None else np.asarray(x[:, :n])  # noqa: E731
        recorded = state.attentions is not None
        return GenerateOutput(
            np.asarray(state.tokens[:, :n]), lengths, decode.stop_reasons(state.done, lengths, max_new_tokens),
            cut(state.logits), attentions=cut(state.attentions),
            prefill_attentions=None if not recorded else np.asarray(state.prefill_attentions),
            prompt_start=None if not recorded else np.argmax(mask, axis=1), logprobs=cut(state.logprobs),
        )
