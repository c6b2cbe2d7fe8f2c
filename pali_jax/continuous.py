"""Continuous batching: a fixed number of decode rows (slots) that are refilled as answers end.

Three compiled programs share one donated state (`Slots`), and a host loop drives them:

  refill   SigLIP + prefill of R new prompts (one prompt bucket) into their own fresh cache, their
           first tokens sampled, then the R rows copied into R free slots;
  decode   up to `steps` decode steps for every slot in one `lax.while_loop`, leaving early once
           `finish_target` answers have ended (so that the host can refill their slots);
  init     the empty state.

The cache keeps the single write index of `kv_cache.KVCache` (every row writes its next token at the
same slot), so attention, masks and RoPE run unchanged: a new prompt is written right-aligned to
the current index, its slots before it marked invalid (as left padding is), and its RoPE positions
count its own real tokens (`KVCache.positions` is per row). Rows therefore start at different
slots; when the index reaches the cache's end, the decode step shifts every row left by the start
of the oldest live row (`_compact`). The cache holds one whole row plus spare slots (`SlotShape`;
16 by default), so a shift always frees at least the spare slots.

Refills run R prompts at once, R a power of two up to the slot count. Prefill is most of the
work (a prompt is many tokens, an answer often a few), and a refill call has a fixed cost besides
its per-row one: few large refills beat many small ones (`benchmarks/annotate.py` runs a job and
reports its refills, decode calls and device time). So a decode call returns once `refill_at`
slots are free, and the free slots are refilled in the binary digits of their number, largest
first, until fewer than `refill_at` are left: those wait for the next refill (none wait once the
input is exhausted).

A slot's answer equals `Generator.generate` on its prompt alone: same prompt bucket, same prefill,
the same tokens fed back; greedy tokens are identical (tests/test_annotate.py), logits equal to
float32 rounding (the softmax runs over a longer, differently masked cache). Sampling gives each
answer its own key (`fold_in(seed key, item id)`) whatever slot it lands in, so a rerun draws the
same answers; another slot arrangement can still change a draw where two tokens' logits agree to
rounding (the sampler ranks tokens by sorting them). Programs compile once per slot shape, prompt
bucket and refill size (a power of two up to the slot count: `_refill_sizes`), never per refill.

`Session` is the host loop's state, one call at a time: `admit` prompts into free slots, `decode`
(optionally reading every live answer's tokens so far: streaming), `cancel` an answer (its slot is
marked ended at the next decode call and can be refilled at once). `ContinuousDecoder.run` drives
one over a finite input (the dataset job); a server's engine (`pali_jax.engine`) drives one over
requests as they come. A prompt may carry its own sampling (`Sampling`: temperature, top-k, top-p
and key, one row each in the state), and with `SlotShape.logprobs` each token's log-probability
is kept beside it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pali_jax import decode
from pali_jax.config import PaliGemmaConfig
from pali_jax.decode import MIN_NEW_TOKENS_BUCKET, StopReason, bucket, decode_bytes, jit_model_program
from pali_jax.generation_config import GenerationConfig, GenerationError, check_memory
from pali_jax.kv_cache import KVCache
from pali_jax.paligemma import PaliGemmaModel
from pali_jax.sampling import SamplingParams, sample_rows, token_logprobs

MAX_SLOTS = 1024  # decode rows; memory is checked too, this bounds the host's bookkeeping
# Default spare cache slots. Each one is attended by every decode step, and a shift (a copy of the
# whole cache, about one decode step) comes at most every `spare` steps: beyond a few, more spare
# slots cost each step more than the rarer shifts save (`benchmarks/annotate.py` times a job).
DEFAULT_SPARE = 16


@flax.struct.dataclass
class Slots:
    cache: KVCache  # [B rows, S slots], one write index for all rows
    tokens: jax.Array  # [B, N] int32: the slot's answer so far, pad after it
    lengths: jax.Array  # [B] int32: tokens emitted by the slot's answer
    limits: jax.Array  # [B] int32: its max_new_tokens
    done: jax.Array  # [B] bool: the answer ended, or the slot is empty
    keys: jax.Array  # [B, 2] uint32: the answer's own sampling key
    sampling: SamplingParams  # leaves [B]: the answer's own sampler settings
    stopping: jax.Array  # [B] bool: a stop token ends the answer (False: only its limit does)
    logprobs: jax.Array  # [B, N] float32 when `SlotShape.logprobs`, else [B, 0]


@dataclasses.dataclass(frozen=True)
class SlotShape:
    """Static sizes of a continuous decode: B rows, prompts of at most `prompt` tokens (image
    tokens included, bucketed), answers of at most `buffer` tokens (bucketed), and `spare` cache
    slots beyond one whole row."""

    rows: int
    prompt: int
    buffer: int
    spare: int
    logprobs: bool = False  # keep each token's log-probability (raw distribution, temperature 1)

    @property
    def cache_length(self) -> int:
        """A live row spans at most prompt + buffer slots, so a shift at the end of the cache frees
        at least `spare` slots: the cache shifts once every `spare` steps or less often."""
        return self.prompt + self.buffer + self.spare


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt ready for a slot: `ids` / `types` / `mask` [P] left-padded to its bucket."""

    item: int  # the caller's id for it (sampling key, results)
    pixels: np.ndarray  # [H, W, 3] in the model's dtype
    ids: np.ndarray
    types: np.ndarray
    mask: np.ndarray
    max_new_tokens: int
    sampling: Sampling | None = None  # its own sampling; None: the run's, its key folded with `item`
    ignore_stop_tokens: bool = False  # answer max_new_tokens tokens whatever they are (load tests)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One answer's sampler settings and key (`GenerationConfig.prng_key`, [2] uint32)."""

    temperature: float
    top_k: int
    top_p: float
    key: np.ndarray

    @classmethod
    def of(cls, generation: GenerationConfig) -> Sampling:
        return cls(generation.effective_temperature, generation.top_k or 0,
                   1.0 if generation.top_p is None else generation.top_p, np.asarray(generation.prng_key()))


@dataclasses.dataclass(frozen=True)
class Answer:
    item: int
    tokens: list[int]  # the stop token included, as `generate` returns it
    stop_reason: StopReason
    latency_s: float  # from its refill to the decode call it ended in
    logprobs: list[float] | None = None  # per token, when `SlotShape.logprobs`


@dataclasses.dataclass(frozen=True)
class Progress:
    """A live answer after a decode call (`Session.decode(progress=True)`): its tokens so far."""

    item: int
    tokens: list[int]
    logprobs: list[float] | None = None


@dataclasses.dataclass
class Counters:
    """What a run did; owned by the caller, filled in by `ContinuousDecoder.run`."""

    refills: int = 0
    decode_calls: int = 0
    decode_steps: int = 0
    slot_steps_used: int = 0  # live rows summed over decode steps: occupancy = used / (steps * rows)
    input_wait_s: float = 0.0  # the device idle: a slot free, the host waiting for the next prompt
    device_s: float = 0.0  # host waiting on refill + decode results


def pad_prompt(cfg: PaliGemmaConfig, ids: list[int], types: list[int]) -> tuple[np.ndarray, ...]:
    """ids, types, mask [P] of one prompt, left-padded to its bucket (`decode.prompt_bucket`)."""
    extra = decode.prompt_bucket(cfg, len(ids)) - len(ids)
    ids = np.array([cfg.pad_token_id] * extra + list(ids), np.int32)
    types = np.array([0] * extra + list(types), np.int32)
    mask = np.array([0] * extra + [1] * (len(ids) - extra), np.int32)
    return ids, types, mask


def check_slots(rows: int) -> int:
    """`rows` if it is a valid number of slots, else a `GenerationError` naming "slots"."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_SLOTS:
        raise GenerationError("slots", f"slots must be an int in [1, {MAX_SLOTS}], got {rows!r}")
    return rows


def slot_shape(
    cfg: PaliGemmaConfig, rows: int, prompt_tokens: int, max_new_tokens: int, spare: int | None = None,
    *, logprobs: bool = False,
) -> SlotShape:
    """The sizes for `rows` slots, prompts of at most `prompt_tokens` real tokens and answers of
    at most `max_new_tokens`; `spare` cache slots (default `DEFAULT_SPARE`); `logprobs`: keep
    each token's log-probability."""
    prompt, buffer = decode.prompt_bucket(cfg, prompt_tokens), bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    spare = DEFAULT_SPARE if spare is None else spare
    if isinstance(spare, bool) or not isinstance(spare, int) or not 1 <= spare <= 1 << 16:
        raise GenerationError("spare_slots", f"spare_slots must be an int in [1, 65536], got {spare!r}")
    return SlotShape(check_slots(rows), prompt, buffer, spare, logprobs)


def _refill_sizes(n: int, least: int) -> list[int]:
    """Refills for n waiting prompts (n <= the slot count): its binary digits, largest first, until
    fewer than `least` prompts are left. None below `least`: a decode call that returned with fewer
    slots free (at the cache's end) goes on; once none is live, `least` is at most what waits."""
    sizes = []
    for b in reversed(range(n.bit_length())):
        if n >> b & 1 and n >= least:
            sizes.append(1 << b)
            n -= 1 << b
    return sizes


class ContinuousDecoder:
    """Compiled continuous batching for one model. Reuse one instance: it holds the programs."""

    def __init__(self, model: PaliGemmaModel, mesh: Mesh | None = None):
        self.model = model
        self.mesh = mesh
        self.traces = 0  # programs traced (each trace is a compile)
        self._init = jax.jit(self._init_impl, static_argnums=0)
        self._refill = jit_model_program(self._refill_impl, model.policy, static_argnums=0, donate_argnums=2)
        self._decode = jit_model_program(self._decode_impl, model.policy, static_argnums=0, donate_argnums=2)

    # -- traced pieces -------------------------------------------------------------------------
    def _init_impl(self, shape: SlotShape) -> Slots:
        self.traces += 1
        cfg = self.model.cfg
        cache = KVCache.init(cfg.text, shape.rows, shape.cache_length, self.model.dtype, self.model.layout.stacked)
        return decode.placed(Slots(
            cache=cache.replace(index=jnp.int32(shape.prompt)),  # room to write a prompt before the index
            tokens=jnp.full((shape.rows, shape.buffer), cfg.pad_token_id, jnp.int32),
            lengths=jnp.zeros((shape.rows,), jnp.int32),
            limits=jnp.zeros((shape.rows,), jnp.int32),
            done=jnp.ones((shape.rows,), bool),
            keys=jnp.zeros((shape.rows, 2), jnp.uint32),
            sampling=SamplingParams(jnp.zeros((shape.rows,), jnp.float32), jnp.zeros((shape.rows,), jnp.int32),
                                    jnp.ones((shape.rows,), jnp.float32)),
            stopping=jnp.ones((shape.rows,), bool),
            logprobs=jnp.zeros((shape.rows, shape.buffer if shape.logprobs else 0), jnp.float32),
        ), self.mesh)

    def _refill_impl(self, shape: SlotShape, params, slots: Slots, pixels, ids, types, mask, rows, limits, folds,
                     keys, sampling: SamplingParams, stopping, stop_tokens) -> Slots:
        """Prompts [R, P] into slots `rows` [R] (free ones): prefill, first token, copy. Row r's
        answer draws with `fold_in(keys[r], folds[r])` and `sampling` (leaves [R]); it ends at a
        stop token where `stopping` [R]."""
        self.traces += 1
        r, p = ids.shape
        logits, fresh, _ = decode.prefill(self.model, self.mesh, p, params, pixels, ids, types, mask)
        keys = jax.vmap(jax.random.fold_in)(keys, folds)  # [R, 2]
        first = sample_rows(logits, jax.vmap(jax.random.fold_in)(keys, jnp.zeros((r,), jnp.int32)), sampling)
        cache = slots.cache
        start = cache.index - p  # right-aligned: the row's next token goes where every row's does
        cols = start + jnp.arange(p)
        stacked = cache.stacked

        def put(old, new):  # old [(L,) B, S, K, H], new [(L,) R, P, K, H]
            return old.at[:, rows[:, None], cols].set(new) if stacked else old.at[rows[:, None], cols].set(new)

        valid = jax.lax.dynamic_update_slice(jnp.zeros((r, cache.length), bool), fresh.valid, (0, start))
        cache = cache.replace(
            k=jax.tree.map(put, cache.k, fresh.k), v=jax.tree.map(put, cache.v, fresh.v),
            valid=cache.valid.at[rows].set(valid), positions=cache.positions.at[rows].set(fresh.positions),
        )
        answer = jnp.full((r, shape.buffer), self.model.cfg.pad_token_id, jnp.int32).at[:, 0].set(first)
        logprobs = jnp.zeros((r, slots.logprobs.shape[1]), jnp.float32)
        if shape.logprobs:
            logprobs = logprobs.at[:, 0].set(token_logprobs(logits, first))
        return decode.placed(slots.replace(
            cache=cache,
            tokens=slots.tokens.at[rows].set(answer),
            lengths=slots.lengths.at[rows].set(1),
            limits=slots.limits.at[rows].set(limits),
            done=slots.done.at[rows].set(jnp.isin(first, stop_tokens) & stopping | (limits <= 1)),
            keys=slots.keys.at[rows].set(keys),
            sampling=jax.tree.map(lambda old, new: old.at[rows].set(new), slots.sampling, sampling),
            stopping=slots.stopping.at[rows].set(stopping),
            logprobs=slots.logprobs.at[rows].set(logprobs),
        ), self.mesh)

    @staticmethod
    def _compact(shape: SlotShape, slots: Slots) -> Slots:
        """Every row shifted left by the first slot of the oldest live row (at most index - prompt,
        so that a prompt still fits before the index)."""
        cache = slots.cache
        first = jnp.where(slots.done, cache.length, jnp.argmax(cache.valid, axis=1))  # [B]
        shift = jnp.minimum(first.min(), cache.index - shape.prompt)
        axis = 2 if cache.stacked else 1
        roll = lambda x: jnp.roll(x, -shift, axis=axis)  # noqa: E731
        index = cache.index - shift
        valid = jnp.roll(cache.valid, -shift, axis=1) & (jnp.arange(cache.length) < index)
        return slots.replace(cache=cache.replace(
            k=jax.tree.map(roll, cache.k), v=jax.tree.map(roll, cache.v), valid=valid, index=index,
        ))

    def _step(self, shape: SlotShape, params, slots: Slots, stop_tokens) -> Slots:
        last = jnp.take_along_axis(slots.tokens, slots.lengths[:, None] - 1, axis=1)[:, 0]  # [B]
        logits, cache, _ = decode.step(self.model, params, last, slots.cache, ~slots.done)
        token = sample_rows(logits, jax.vmap(jax.random.fold_in)(slots.keys, slots.lengths), slots.sampling)
        at = jnp.where(slots.done, shape.buffer, slots.lengths)  # ended rows write nothing (dropped)
        tokens = slots.tokens.at[jnp.arange(shape.rows), at].set(token, mode="drop")
        logprobs = slots.logprobs
        if shape.logprobs:
            logprobs = logprobs.at[jnp.arange(shape.rows), at].set(token_logprobs(logits, token), mode="drop")
        lengths = slots.lengths + ~slots.done
        done = slots.done | jnp.isin(token, stop_tokens) & slots.stopping | (lengths >= slots.limits)
        return decode.placed(slots.replace(cache=cache, tokens=tokens, lengths=lengths, done=done, logprobs=logprobs),
                             self.mesh)

    def _decode_impl(self, shape: SlotShape, params, slots: Slots, steps, finish_target, cancel, stop_tokens):
        """Up to `steps` steps; stops early once `finish_target` rows live at the start have ended,
        or when the cache is full (the next call shifts it first). Rows `cancel` [B] end first
        (their answers were abandoned). The shift stays out of the loop: a conditional inside it
        costs a copy of the whole cache at every step."""
        self.traces += 1
        slots = slots.replace(done=slots.done | cancel)
        slots = jax.lax.cond(
            slots.cache.index >= slots.cache.length, lambda s: self._compact(shape, s), lambda s: s, slots
        )
        live = ~slots.done

        def running(carry):
            i, _, s = carry
            return decode.running(i, steps, s.done, s.cache) & ((live & s.done).sum() < finish_target)

        def body(carry):
            i, used, s = carry
            return i + 1, used + (~s.done).sum(dtype=jnp.int32), self._step(shape, params, s, stop_tokens)

        steps_run, used, slots = jax.lax.while_loop(running, body, (jnp.int32(0), jnp.int32(0), slots))
        return steps_run, used, decode.placed(slots, self.mesh)

    # -- host API ------------------------------------------------------------------------------
    def check(self, shape: SlotShape) -> None:
        """Refuses sizes whose cache and buffers do not fit in memory, before anything is allocated."""
        need = decode_bytes(self.model.cfg, shape.rows, shape.cache_length, shape.buffer, self.model.dtype, False)
        check_memory(
            need, f"the KV cache and output buffers of {shape.rows} slots ({shape.cache_length} cache slots)", "slots",
            devices=1 if self.mesh is None else self.mesh.devices.size,
            device=None if self.mesh is None else self.mesh.devices.flat[0],
        )

    def run(
        self,
        params,
        shape: SlotShape,
        prompts: Callable[[], Prompt | None],
        generation: GenerationConfig,
        *,
        refill_at: int | None = None,
        counters: Counters | None = None,
    ) -> Iterator[Answer]:
        """Answers prompts in the order they end.

        prompts(): the next prompt, None when there are no more. It is asked for one whenever a
        slot is free, and the time it takes is the device's idle time (`Counters.input_wait_s`):
        so which prompts share a refill, and every answer, depend on the prompts alone, never on
        how fast they came. refill_at: how many slots are free when a decode call returns to
        refill them (default rows // 8; at least 1, at most rows): larger refills and fewer host
        round trips against emptier slots.
        """
        session = Session(self, params, shape, generation, counters)
        counters = session.counters
        refill_at = min(max(1, shape.rows // 8 if refill_at is None else refill_at), shape.rows)
        waiting: deque[Prompt] = deque()
        exhausted = False
        while True:
            free = len(session.free_rows())
            while not exhausted and len(waiting) < free:
                t0 = time.perf_counter()
                prompt = prompts()
                counters.input_wait_s += time.perf_counter() - t0
                exhausted = prompt is None
                if prompt is not None:
                    waiting.append(prompt)
            session.admit(waiting, 1 if exhausted else refill_at)
            live = session.live
            if not live:
                if exhausted and not waiting:
                    return
                continue
            more = bool(waiting) or not exhausted
            target = min(max(1, refill_at - (shape.rows - live)), live) if more else live
            answers, _ = session.decode(shape.buffer, target)
            yield from answers


class Session:
    """One continuous decode driven call by call: `admit` prompts into free slots, `decode`,
    `cancel` an answer. The state lives on the device (donated from call to call); the host keeps
    which prompt owns each slot. Not thread-safe: one thread drives it."""

    def __init__(self, decoder: ContinuousDecoder, params, shape: SlotShape, generation: GenerationConfig,
                 counters: Counters | None = None):
        self.decoder, self.params, self.shape = decoder, params, shape
        self.counters = Counters() if counters is None else counters
        self.sampling = Sampling.of(generation)  # prompts without their own
        self.stops = decode.stop_tokens(decoder.model.cfg, generation)
        self.slots = decoder._init(shape)
        self.owner: list[tuple[Prompt, float] | None] = [None] * shape.rows  # (prompt, refilled at)
        self.cancelled = np.zeros(shape.rows, bool)  # rows to end at the next decode call

    def free_rows(self) -> list[int]:
        return [b for b in range(self.shape.rows) if self.owner[b] is None]

    @property
    def live(self) -> int:
        """Slots holding an answer that has not been reported ended."""
        return sum(o is not None for o in self.owner)

    def cancel(self, item: int) -> bool:
        """Abandons `item`'s answer: its slot is free now (an `admit` may refill it) and, unless
        refilled first, ends at the next decode call. False if no slot holds it."""
        for b, o in enumerate(self.owner):
            if o is not None and o[0].item == item:
                self.owner[b] = None
                self.cancelled[b] = True
                return True
        return False

    def admit(self, waiting: deque[Prompt], least: int) -> None:
        """Moves waiting prompts into free slots, per prompt bucket (`_refill_sizes`: at most
        `least` - 1 of a bucket wait for a later refill); those left over go back to the front of
        `waiting`, in order."""
        free = self.free_rows()
        taken = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
        by_bucket: dict[int, list[Prompt]] = {}
        for prompt in taken:
            by_bucket.setdefault(len(prompt.ids), []).append(prompt)
        filled = set()
        free = iter(free)
        for group in by_bucket.values():
            for size in _refill_sizes(len(group), least):
                part, group = group[:size], group[size:]
                rows = [next(free) for _ in part]
                own = [p.sampling or self.sampling for p in part]
                t0 = time.perf_counter()
                self.slots = self.decoder._refill(
                    self.shape, self.params, self.slots,
                    np.stack([p.pixels for p in part]), np.stack([p.ids for p in part]),
                    np.stack([p.types for p in part]), np.stack([p.mask for p in part]),
                    np.array(rows, np.int32), np.array([p.max_new_tokens for p in part], np.int32),
                    np.array([p.item if p.sampling is None else 0 for p in part], np.int32),
                    np.stack([s.key for s in own]).astype(np.uint32),
                    SamplingParams(np.array([s.temperature for s in own], np.float32),
                                   np.array([s.top_k for s in own], np.int32),
                                   np.array([s.top_p for s in own], np.float32)),
                    np.array([not p.ignore_stop_tokens for p in part]), self.stops,
                )
                self.counters.device_s += time.perf_counter() - t0
                self.counters.refills += 1
                for b, p in zip(rows, part):
                    self.owner[b] = (p, time.perf_counter())
                    self.cancelled[b] = False  # the refill rewrote the row
                    filled.add(id(p))
        waiting.extendleft(reversed([p for p in taken if id(p) not in filled]))

    def decode(self, steps: int, target: int, *, progress: bool = False) -> tuple[list[Answer], list[Progress]]:
        """One decode call of at most `steps` steps, returning once `target` live answers have
        ended: (the answers that ended, and with `progress` every other live answer's tokens so far)."""
        t0 = time.perf_counter()
        steps_run, used, self.slots = self.decoder._decode(
            self.shape, self.params, self.slots, jnp.int32(steps), jnp.int32(target), self.cancelled, self.stops
        )
        self.cancelled = np.zeros(self.shape.rows, bool)
        done, lengths = np.asarray(self.slots.done), np.asarray(self.slots.lengths)
        now = time.perf_counter()
        c = self.counters
        c.device_s += now - t0
        c.decode_calls += 1
        c.decode_steps += int(steps_run)
        c.slot_steps_used += int(used)
        ended = [b for b in range(self.shape.rows) if self.owner[b] is not None and done[b]]
        read = [b for b in range(self.shape.rows) if self.owner[b] is not None] if progress else ended
        if not read:
            return [], []
        tokens = np.asarray(self.slots.tokens)
        logprobs = np.asarray(self.slots.logprobs) if self.shape.logprobs else None
        answers, partial = [], []
        for b in read:
            prompt, started = self.owner[b]
            row = tokens[b, : lengths[b]].tolist()
            scores = None if logprobs is None else logprobs[b, : lengths[b]].tolist()
            if done[b]:
                self.owner[b] = None
                stopped = np.isin(row[-1], self.stops) and not prompt.ignore_stop_tokens
                reason = StopReason.STOP_TOKEN if stopped else StopReason.MAX_NEW_TOKENS
                answers.append(Answer(prompt.item, row, reason, now - started, scores))
            else:
                partial.append(Progress(prompt.item, row, scores))
        return answers, partial
