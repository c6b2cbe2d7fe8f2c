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
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pali_jax import sharding
from pali_jax.errors import UserError
from pali_jax.kv_cache import KVCache
from pali_jax.paligemma import PaliGemmaModel
from pali_jax.sampling import SamplingParams, sample

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


def jit_model_program(fun: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit` for every program that runs the model for inference (generation, beam search,
    forward): on CPU, compiled without while-loop invariant code motion.

    XLA:CPU computes every bf16 op except YNNPACK's matmuls in float32, converting operands as it
    goes (its `float-normalization-bf16` pass); invariant code motion then hoists the conversion of
    each stacked layer weight, and of the embedding table, out of the decode loop and the layer scan,
    so a bf16 model ran on a float32 copy of all its weights (7.3 GB of temporaries for 1.6 GB of
    bf16 parameters, PaliGemma 1 widths with 2 + 2 layers). Left in the loop, each conversion is
    fused with the slice of its layer. float32 programs compile to the same code either way.
    """
    on_cpu = jax.default_backend() == "cpu"
    options = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"} if on_cpu else None
    return jax.jit(fun, compiler_options=options, **jit_kwargs)


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # [] int32: tokens emitted so far
    tokens: jax.Array  # [B, N] int32: emitted tokens, pad after a row's stop token
    lengths: jax.Array  # [B] int32: tokens emitted per row (its stop token included)
    done: jax.Array  # [B] bool
    cache: KVCache
    key: jax.Array
    logits: jax.Array | None  # [B, N, V] float32 when asked for (tests, scoring), else None


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Host-side result: `tokens` [B, n] (n = longest row; pad after each row's end)."""

    tokens: np.ndarray
    lengths: np.ndarray
    stop_reason: list[StopReason]
    logits: np.ndarray | None = None  # [B, n, V] per-step logits, when asked for
    scores: np.ndarray | None = None  # [B] beam search: length-normalised log-probability


def stop_reasons(done, lengths, max_new_tokens: int) -> list[StopReason]:
    return [
        StopReason.STOP_TOKEN if d else StopReason.MAX_NEW_TOKENS if n >= max_new_tokens else StopReason.CACHE_FULL
        for d, n in zip(np.asarray(done), np.asarray(lengths))
    ]


def prefill(model: PaliGemmaModel, mesh: Mesh | None, cache_length: int, params, pixels, ids, types, mask):
    """Traced: image + prompts into a fresh cache of `cache_length` slots; (last logits [B, V], cache)."""
    cache = KVCache.init(model.cfg.text, ids.shape[0], cache_length, model.dtype)
    if mesh is not None:  # host inputs and the fresh cache carry no sharding: pin them
        pixels, ids, types, mask = sharding.constrain_batch((pixels, ids, types, mask), mesh)
        cache = sharding.constrain_cache(cache, mesh)
    return model.apply({"params": params}, pixels, ids, types, mask, cache, method=PaliGemmaModel.prefill)


@dataclasses.dataclass(frozen=True)
class _Statics:
    buffer: int  # N
    cache_length: int  # S
    keep_logits: bool


def prepare_prompts(cfg, ids, types, mask, max_new_tokens, stop_tokens, cache_length, keep_logits):
    """Host-side checks and bucketing: left-pads prompts to their bucket, sizes buffer and cache,
    and packs the stop tokens into a fixed-size array (fixed shape: no recompile)."""
    ids = np.asarray(ids, np.int32)
    length = ids.shape[1]
    types = np.zeros_like(ids) if types is None else np.asarray(types, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not mask[:, -1].all():
        raise UserError("prompts must be left-padded: the last position of every row must be a real token")
    padded = cfg.num_image_tokens + bucket(max(length - cfg.num_image_tokens, 1), MIN_TEXT_BUCKET)
    extra = padded - length
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=cfg.pad_token_id)
    types, mask = np.pad(types, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))
    buffer = bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    statics = _Statics(buffer, cache_length or padded + buffer, keep_logits)
    if statics.cache_length <= padded:
        raise UserError(f"cache_length {statics.cache_length} leaves no room after a {padded}-token prompt")
    stops = sorted(set(cfg.eos_token_ids) | set(stop_tokens or ()))
    stops = np.array(stops + [-1] * (bucket(len(stops), 8) - len(stops)), np.int32)
    return statics, ids, types, mask, stops


class Generator:
    """Compiled generation for one model. Reuse one instance: it holds the compiled programs."""

    def __init__(self, model: PaliGemmaModel, mesh: Mesh | None = None):
        self.model = model
        self.mesh = mesh  # params placed by pali_jax.sharding on this mesh; None: one device
        self.traces = 0  # how many programs were traced (each trace is a compile)
        self._generate = jit_model_program(self._generate_impl, static_argnums=0)
        self._prefill = jit_model_program(self._prefill_impl, static_argnums=0)
        self._step = jit_model_program(self._step_impl, donate_argnums=1)

    # -- traced pieces -------------------------------------------------------------------------
    def _emit(self, state: DecodeState, token, logits, stop_tokens) -> DecodeState:
        pad = self.model.cfg.pad_token_id
        token = jnp.where(state.done, pad, token).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
        if state.logits is not None:
            state = state.replace(logits=jax.lax.dynamic_update_slice(state.logits, logits[:, None], (0, state.step, 0)))
        stopped = jnp.isin(token, stop_tokens) & ~state.done
        return self._host_readable(state.replace(
            step=state.step + 1, tokens=tokens, lengths=state.lengths + (~state.done), done=state.done | stopped
        ))

    def _host_readable(self, state: DecodeState) -> DecodeState:
        """Under a mesh, the outputs the host reads made whole on every device: in a multi-host run
        a process can only fetch arrays its own devices hold entirely."""
        if self.mesh is None:
            return state
        outputs = {k: getattr(state, k) for k in ("tokens", "lengths", "done", "logits")}
        return state.replace(**sharding.replicate(outputs, self.mesh))

    def _prefill_impl(self, statics: _Statics, params, pixels, ids, types, mask, sampling, key, stop_tokens):
        self.traces += 1
        cfg = self.model.cfg
        batch = ids.shape[0]
        logits, cache = prefill(self.model, self.mesh, statics.cache_length, params, pixels, ids, types, mask)
        state = DecodeState(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch, statics.buffer), cfg.pad_token_id, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            done=jnp.zeros((batch,), bool),
            cache=cache,
            key=key,
            logits=jnp.zeros((batch, statics.buffer, cfg.vocab_size), jnp.float32) if statics.keep_logits else None,
        )
        token = sample(logits, jax.random.fold_in(key, 0), sampling)
        return self._emit(state, token, logits, stop_tokens)

    def _step_impl(self, params, state: DecodeState, sampling, stop_tokens) -> DecodeState:
        prev = jax.lax.dynamic_index_in_dim(state.tokens, state.step - 1, axis=1)  # [B, 1]
        logits, cache = self.model.apply(
            {"params": params}, prev, state.cache, ~state.done[:, None], method=PaliGemmaModel.step
        )
        if self.mesh is not None:  # keeps the while loop's carried cache in its layout
            cache = sharding.constrain_cache(cache, self.mesh)
        token = sample(logits[:, 0], jax.random.fold_in(state.key, state.step), sampling)
        return self._emit(state.replace(cache=cache), token, logits[:, 0], stop_tokens)

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
    def generate(
        self,
        params,
        pixel_values,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        *,
        max_new_tokens: int = 32,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_tokens: tuple[int, ...] = (),
        cache_length: int | None = None,
        return_logits: bool = False,
    ) -> GenerateOutput:
        """Decodes a batch of left-padded prompts; see the module docstring."""
        statics, ids, types, mask, stops = prepare_prompts(
            self.model.cfg, input_ids, token_type_ids, attention_mask, max_new_tokens, stop_tokens, cache_length,
            return_logits,
        )
        key = jax.random.PRNGKey(seed)
        sampling = sampling or SamplingParams.greedy()
        state = self._generate(
            statics, params, pixel_values, ids, types, mask, jnp.int32(max_new_tokens), sampling, key, stops
        )
        return self._output(state, max_new_tokens)

    def stream(
        self,
        params,
        pixel_values,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        *,
        max_new_tokens: int = 32,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_tokens: tuple[int, ...] = (),
        cache_length: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yields each step's tokens [B] (pad for rows already done) as they are decoded."""
        statics, ids, types, mask, stops = prepare_prompts(
            self.model.cfg, input_ids, token_type_ids, attention_mask, max_new_tokens, stop_tokens, cache_length, False
        )
        key = jax.random.PRNGKey(seed)
        sampling = sampling or SamplingParams.greedy()
        state = self._prefill(statics, params, pixel_values, ids, types, mask, sampling, key, stops)
        limit = jnp.int32(max_new_tokens)
        while True:
            step = int(state.step)
            yield np.asarray(state.tokens[:, step - 1])
            if not bool(self._running(state, limit)):
                return
            state = self._step(params, state, sampling, stops)

    def _output(self, state: DecodeState, max_new_tokens: int) -> GenerateOutput:
        lengths = np.asarray(state.lengths)
        n = int(lengths.max())
        logits = None if state.logits is None else np.asarray(state.logits[:, :n])
        return GenerateOutput(
            np.asarray(state.tokens[:, :n]), lengths, stop_reasons(state.done, lengths, max_new_tokens), logits
        )
