"""The decode core: what every program that decodes over the KV cache shares.

Three drivers run it: `generate.Generator` (fixed batches: a whole decode in one program, or one
step per call for `stream`), `beam_search.BeamSearch` (`beams` hypotheses per prompt) and
`continuous.ContinuousDecoder` (slots refilled as answers end). Each one owns its state and how
it picks the next tokens; this module owns the rest, once:

  * host side, before anything is compiled: the shape buckets (`prompt_bucket`, `bucket`), the
    checks and padding of a batch of prompts (`prepare_prompts`), the memory a decode needs
    (`decode_bytes`), the stop tokens packed into a fixed-size array (`stop_tokens`), the refusal
    of recorded outputs where a driver cannot give them (`refuse_records`);
  * traced: the prefill (`prefill`), the one application of the model to the cache per decode
    step (`step`), the test of whether a loop goes on (`running`), and the placement of a decode
    state under a mesh (`placed`);
  * the host-side result (`GenerateOutput`): joining batches, per-row views.

Shape buckets keep the number of compiled programs small:
  * prompt length: the text part (everything after the image tokens, padding included) is
    left-padded to the next power of two >= 16, so prompts of 1..200 text tokens use 5 programs
    (16, 32, 64, 128, 256);
  * the output buffer holds the next power of two >= max(max_new_tokens, 32) tokens;
  * the cache has prompt bucket + buffer slots unless `cache_length` says otherwise.
The stop tokens are a traced array of a bucketed size: other stop tokens do not recompile.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Callable

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

MIN_TEXT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 32
MIN_STOP_TOKENS_BUCKET = 8


class StopReason(enum.IntEnum):
    STOP_TOKEN = 0  # EOS or a user stop token was emitted (and is part of the output)
    MAX_NEW_TOKENS = 1
    CACHE_FULL = 2


def bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_bucket(cfg: PaliGemmaConfig, length: int) -> int:
    """The padded length (image tokens included) of a prompt of `length` tokens: its text part
    bucketed (`MIN_TEXT_BUCKET`)."""
    return cfg.num_image_tokens + bucket(max(length - cfg.num_image_tokens, 1), MIN_TEXT_BUCKET)


def stop_tokens(cfg: PaliGemmaConfig, generation: GenerationConfig) -> np.ndarray:
    """The model's EOS ids and the user's stop tokens as int32 [K], K bucketed, padded with -1
    (never a token): a fixed shape, so other stop tokens do not recompile."""
    stops = sorted(set(cfg.eos_token_ids) | set(generation.stop_tokens))
    return np.array(stops + [-1] * (bucket(len(stops), MIN_STOP_TOKENS_BUCKET) - len(stops)), np.int32)


def refuse_records(generation: GenerationConfig, message: str) -> None:
    """A `GenerationError` naming the first recorded output asked for (`GenerationConfig.records`),
    for a driver that gives tokens only; `message` says why, `{name}` standing for the option."""
    if generation.records:
        name = generation.records[0]
        raise GenerationError(name, message.format(name=name))


def jit_model_program(fun: Callable, policy: backend.Policy, **jit_kwargs: Any) -> Callable:
    """`jax.jit` for every program that runs the model for inference (generation, beam search,
    continuous batching, forward), with the compiler options of the platform it is for
    (`backend.Policy.compiler_options`)."""
    return jax.jit(fun, compiler_options=policy.compiler_options(), **jit_kwargs)


# -- host side: a fixed batch of prompts ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DecodeStatics:
    """The static (compile-time) sizes and switches of a fixed-batch decode."""

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
) -> tuple[DecodeStatics, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host-side checks and bucketing, all before anything is allocated or compiled: checks the
    options against the model (positions, vocabulary) and the machine (cache and buffers against
    free memory), left-pads prompts to their bucket, sizes buffer and cache, and packs the stop
    tokens (`stop_tokens`)."""
    generation.check_model(cfg)
    ids = np.asarray(ids, np.int32)
    length = ids.shape[1]
    types = np.zeros_like(ids) if types is None else np.asarray(types, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    if not mask[:, -1].all():
        raise UserError("prompts must be left-padded: the last position of every row must be a real token")
    generation.check_prompt_length(cfg, int(mask.sum(axis=1).max()))
    padded = prompt_bucket(cfg, length)
    extra = padded - length
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=cfg.pad_token_id)
    types, mask = np.pad(types, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))
    buffer = bucket(generation.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    statics = DecodeStatics(
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
    return statics, ids, types, mask, stop_tokens(cfg, generation)


# -- traced: the model over the cache -------------------------------------------------------------
def prefill(
    model: PaliGemmaModel, mesh: Mesh | None, cache_length: int, params, pixels, ids, types, mask, *, record=False
):
    """Image + prompts into a fresh cache of `cache_length` slots; (last logits [B, V], cache, the
    decoder's attention probabilities [L, B, N, T, S] if `record` else None)."""
    cache = KVCache.init(model.cfg.text, ids.shape[0], cache_length, model.dtype, model.layout.stacked)
    if mesh is not None:  # host inputs and the fresh cache carry no sharding: pin them
        pixels, ids, types, mask = sharding.constrain_batch((pixels, ids, types, mask), mesh)
        cache = sharding.constrain_cache(cache, mesh)
    (logits, cache), attentions = apply_recording(
        model, {"params": params}, pixels, ids, types, mask, cache, method=PaliGemmaModel.prefill, record=record
    )
    return logits, cache, attentions


def step(model: PaliGemmaModel, params, last, cache: KVCache, live, *, record: bool = False):
    """One decode step: every row's last token `last` [B] written into the cache at its write index
    (rows with `live` [B] False write an invalid slot); (logits [B, V] float32, cache, the
    attention of the step's query [L, B, N, 1, S] if `record` else None)."""
    (logits, cache), attention = apply_recording(
        model, {"params": params}, last[:, None], cache, live[:, None], method=PaliGemmaModel.step, record=record
    )
    return logits[:, 0], cache, attention


def running(step_count, limit, done, cache: KVCache) -> jax.Array:
    """Whether a decode loop goes on: fewer than `limit` steps taken, a row not `done`, and a free
    cache slot (the cache is never written past its end)."""
    return (step_count < limit) & ~done.all() & (cache.index < cache.length)


def placed(state, mesh: Mesh | None):
    """Under a mesh: a decode state (a flax struct with a `cache`) with its cache pinned to its
    layout (XLA cannot infer one for a while loop's carry, nor after a gather of rows) and every
    other array whole on every device: the host reads them, and in a multi-host run a process can
    only fetch arrays its own devices hold entirely."""
    if mesh is None:
        return state
    rest = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "cache"}
    return state.replace(cache=sharding.constrain_cache(state.cache, mesh), **sharding.replicate(rest, mesh))


# -- host side: the result ------------------------------------------------------------------------
def stop_reasons(done, lengths, max_new_tokens: int) -> list[StopReason]:
    """Why each row ended: its stop token, `max_new_tokens`, or else a full cache."""
    return [
        StopReason.STOP_TOKEN if d else StopReason.MAX_NEW_TOKENS if n >= max_new_tokens else StopReason.CACHE_FULL
        for d, n in zip(np.asarray(done), np.asarray(lengths))
    ]


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Host-side result: `tokens` [B, n] (n = longest row; pad after each row's end)."""

    tokens: np.ndarray
    lengths: np.ndarray
    stop_reason: list[StopReason]
    logits: np.ndarray | None = None  # [B, n, V] per-step logits, when asked for
    scores: np.ndarray | None = None  # [B] beam search: length-normalised log-probability
    # output_attentions: [B, n, L, N, S] (per new token, the attention of the pass that produced it)
    # and [B, L, N, T, S] (the prefill's) over the S cache slots, where row b's prompt starts at slot
    # prompt_start[b] (left padding before it) and its j-th new token sits at slot T + j;
    # output_scores: log-probabilities [B, n] (0 past a row's end).
    attentions: np.ndarray | None = None
    prefill_attentions: np.ndarray | None = None
    prompt_start: np.ndarray | None = None
    logprobs: np.ndarray | None = None

    def row_tokens(self, row: int) -> list[int]:
        """Row `row`'s generated ids, its stop token included, no padding."""
        return self.tokens[row, : self.lengths[row]].tolist()

    def row_records(self, row: int) -> dict[str, np.ndarray]:
        """What was recorded for row `row`, cut to its own positions (no padding, no empty slots):
        `logprobs` [n], `attentions` [n, L, N, T + n - 1] (new token j sees positions < T + j),
        `prefill_attentions` [L, N, T, T], T its own prompt length; those recorded only."""
        n = int(self.lengths[row])
        fields = {} if self.logprobs is None else {"logprobs": self.logprobs[row, :n]}
        if self.attentions is not None:
            start, prompt = int(self.prompt_start[row]), self.prefill_attentions.shape[3]
            fields["attentions"] = self.attentions[row, :n, ..., start : prompt + n - 1]
            fields["prefill_attentions"] = self.prefill_attentions[row, :, :, start:, start:prompt]
        return fields

    @classmethod
    def concatenate(cls, outputs: list[GenerateOutput], pad: int) -> GenerateOutput:
        """Batches' outputs as one, their token axes padded to the longest (tokens with `pad`),
        their recorded attentions on one slot axis (`_aligned_slots`)."""
        if len(outputs) == 1:
            return outputs[0]
        n = max(out.tokens.shape[1] for out in outputs)

        def join(arrays: list[np.ndarray | None], value) -> np.ndarray | None:
            if arrays[0] is None:
                return None
            widths = lambda x: [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)  # noqa: E731
            return np.concatenate([np.pad(x, widths(x), constant_values=value) if x.ndim > 1 else x for x in arrays])

        attentions = prefill_attentions = prompt_start = None
        if outputs[0].attentions is not None:
            attentions, prefill_attentions, prompt_start = cls._aligned_slots(outputs, n)
        return cls(
            join([out.tokens for out in outputs], pad),
            join([out.lengths for out in outputs], 0),
            [reason for out in outputs for reason in out.stop_reason],
            join([out.logits for out in outputs], 0.0),
            join([out.scores for out in outputs], 0.0),
            attentions=attentions, prefill_attentions=prefill_attentions, prompt_start=prompt_start,
            logprobs=join([out.logprobs for out in outputs], 0.0),
        )

    @staticmethod
    def _aligned_slots(outputs: list[GenerateOutput], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batches' recorded attentions on one slot axis: each batch's slots shifted right by the
        difference of its prompt bucket T to the longest (more left padding), so that new token j
        sits at slot T_max + j in every row, and padded with zeros on the right to the longest cache."""
        prompts = [out.prefill_attentions.shape[3] for out in outputs]  # T of each batch
        t_max = max(prompts)
        s_max = max(out.attentions.shape[-1] + t_max - t for out, t in zip(outputs, prompts))
        steps, prefills, starts = [], [], []
        for out, t in zip(outputs, prompts):
            shift, s = t_max - t, out.attentions.shape[-1]
            slots = [(shift, s_max - s - shift)]
            steps.append(np.pad(out.attentions, [(0, 0), (0, n - out.attentions.shape[1]), (0, 0), (0, 0), *slots]))
            prefills.append(np.pad(out.prefill_attentions, [(0, 0), (0, 0), (0, 0), (shift, 0), *slots]))
            starts.append(out.prompt_start + shift)
        return np.concatenate(steps), np.concatenate(prefills), np.concatenate(starts)
