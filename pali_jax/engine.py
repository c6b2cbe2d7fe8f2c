"""The decoder behind `pali-jax serve`: requests wait in a bounded queue, one thread drives the
continuous decoder's slots (`continuous.Session`), and each request's tokens go back as they come.

    engine = Engine(pg, shape, queue_size=64, steps=8)
    engine.start()                      # compiles every program (warm-up), then serves
    item = engine.submit(prompt, sampling, deliver)    # `deliver(Event)` runs on the engine thread
    engine.cancel(item)                 # the client went away: its slot is free at the next decode call
    engine.stop()

One thread owns the device state; callers (the HTTP handlers) only put requests in the queue and
take events out, so there is one decode loop (`continuous.py`, with `decode.py`'s step) whatever
the number of clients. Between two decode calls the thread ends cancelled answers, admits waiting
requests into free slots (one refill per prompt bucket and power-of-two count) and runs the next
call: at most `steps` decode steps, returning as soon as one answer ends while requests wait. A
request therefore waits at most one decode call for a free slot, and its tokens arrive in pieces
of at most `steps` tokens.

Warm-up runs every refill size of every prompt bucket up to the shape's and one decode call on
dummy prompts, so that no request compiles anything; without it programs compile on first use
(`Metrics.compiled` counts them, `/metrics` reports it).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pali_jax.continuous import Prompt, Sampling, Session, SlotShape, pad_prompt
from pali_jax.decode import MIN_TEXT_BUCKET, StopReason
from pali_jax.generation_config import GenerationConfig

if TYPE_CHECKING:
    from pali_jax.pretrained import PaliGemma

log = logging.getLogger(__name__)

# Latency buckets (seconds) of the histograms: a toy model answers in milliseconds, a 3B model on
# a loaded machine in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


class QueueFull(Exception):
    """The queue holds `queue_size` requests: come back later (HTTP 429)."""


class NotServing(Exception):
    """The engine is compiling, stopping or stopped (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request learns after a decode call: its tokens so far (stop token included), their
    log-probabilities when kept, and on the last event why it ended (or `error`: it never will)."""

    tokens: list[int]
    logprobs: list[float] | None = None
    stop_reason: StopReason | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.stop_reason is not None or self.error is not None


class Metrics:
    """The Prometheus metrics of one server, in their own registry (several servers can share a
    process: tests)."""

    def __init__(self, slots: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("pali_jax_queue_depth", "requests waiting for a slot", registry=r)
        self.slots = Gauge("pali_jax_slots", "decode slots", registry=r)
        self.slots.set(slots)
        self.busy = Gauge("pali_jax_slots_busy", "slots holding an answer", registry=r)
        self.tokens = Counter("pali_jax_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_s = Gauge("pali_jax_tokens_per_second", f"tokens generated per second over the last "
                                  f"{RATE_WINDOW_S:.0f} s", registry=r)
        self.decode_calls = Counter("pali_jax_decode_calls", "decode calls", registry=r)
        self.refills = Counter("pali_jax_refills", "refill calls (prefills of new requests)", registry=r)
        self.cancelled = Counter("pali_jax_cancelled", "answers abandoned in a slot (client gone, timeout, stop "
                                 "string) and their slot freed", registry=r)
        self.compiled = Gauge("pali_jax_programs_compiled", "decoder programs compiled (warm-up included)",
                              registry=r)
        self.ready = Gauge("pali_jax_ready", "1 once every program is compiled and requests are served", registry=r)
        self.ttft = Histogram("pali_jax_time_to_first_token_seconds", "from the request's arrival to its first "
                              "token", buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("pali_jax_request_latency_seconds", "from the request's arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("pali_jax_requests", "requests answered, by HTTP status", ["status"], registry=r)
        self._window: deque[tuple[float, int]] = deque()
        self._window_tokens = 0  # the sum over _window

    def add_tokens(self, n: int, now: float) -> None:
        self.tokens.inc(n)
        self._window.append((now, n))
        self._window_tokens += n
        while self._window and self._window[0][0] < now - RATE_WINDOW_S:
            self._window_tokens -= self._window.popleft()[1]
        span = max(now - self._window[0][0], 1e-3) if len(self._window) > 1 else RATE_WINDOW_S
        self.tokens_per_s.set(self._window_tokens / span)


@dataclasses.dataclass
class _Request:
    prompt: Prompt
    deliver: Callable[[Event], None]
    arrived: float
    sent: int = 0  # tokens delivered so far


class Engine:
    """Continuous decoding for a server: `shape` fixes the slots, the longest prompt bucket and the
    longest answer; `steps`: decode steps per call at most (the streaming granularity, and how long
    a new request may wait for a free slot)."""

    def __init__(self, pg: PaliGemma, shape: SlotShape, *, queue_size: int, steps: int,
                 metrics: Metrics | None = None):
        self.pg, self.shape, self.queue_size, self.steps = pg, shape, queue_size, steps
        self.metrics = Metrics(shape.rows) if metrics is None else metrics
        self.ready = threading.Event()
        self.failed: str | None = None  # the engine thread died (a bug): why
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._cancels: list[int] = []
        self._requests: dict[int, _Request] = {}  # admitted (in a slot)
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the callers' side (any thread) --------------------------------------------------------
    def start(self, *, warm_up: bool = True) -> None:
        self._thread = threading.Thread(target=self._run, args=(warm_up,), name="pali-jax-engine", daemon=True)
        self._thread.start()

    @property
    def serving(self) -> bool:
        return self.ready.is_set() and not self._stopping and self.failed is None

    def submit(self, prompt: Prompt, sampling: Sampling | None, deliver: Callable[[Event], None]) -> int:
        """Queues a prompt (its `item` is replaced by the engine's id, returned). `deliver` is
        called on the engine thread after each decode call that gave the request new tokens; it
        must only hand the event over (e.g. `loop.call_soon_threadsafe`). Raises `QueueFull` or
        `NotServing`."""
        with self._lock:
            if not self.serving:
                raise NotServing("the server is " + ("stopping" if self._stopping or self.failed else "starting"))
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue's limit)")
            item = next(self._ids)
            prompt = dataclasses.replace(prompt, item=item, sampling=sampling)
            self._waiting.append(_Request(prompt, deliver, time.perf_counter()))
            self.metrics.queue_depth.set(len(self._waiting))
            self._lock.notify()
        return item

    def cancel(self, item: int) -> None:
        """Abandons a request: out of the queue now, or its slot freed at the next decode call.
        Nothing is delivered to it afterwards. Harmless for a request that has ended."""
        with self._lock:
            for request in self._waiting:
                if request.prompt.item == item:
                    self._waiting.remove(request)
                    self.metrics.queue_depth.set(len(self._waiting))
                    return
            self._cancels.append(item)
            self._lock.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Ends the thread: requests still waiting or decoding get an error event."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def busy(self) -> int:
        """Requests waiting or decoding."""
        with self._lock:
            return len(self._waiting) + len(self._requests)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self, warm_up: bool) -> None:
        session = None
        try:
            if warm_up:
                self._warm_up()
            session = Session(self.pg.continuous, self.pg.params, self.shape, GenerationConfig())
            self.metrics.compiled.set(self.pg.continuous.traces)
            self.ready.set()
            self.metrics.ready.set(1)
            self._serve(session)
        except Exception as e:  # a bug or the device failing: say so to every request, keep the process up
            log.exception("the decode engine failed")
            self.failed = f"the decode engine failed: {type(e).__name__}: {e}"
        finally:
            self.metrics.ready.set(0)
            with self._lock:
                orphans = list(self._waiting) + list(self._requests.values())
                self._waiting.clear()
                self._requests.clear()
            for request in orphans:
                request.deliver(Event([], error=self.failed or "the server is shutting down"))

    def _serve(self, session: Session) -> None:
        m = self.metrics
        while True:
            with self._lock:
                while not (self._waiting or self._cancels or session.live or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    return
                cancels, self._cancels = self._cancels, []
                for item in cancels:
                    self._requests.pop(item, None)
                    if session.cancel(item):
                        m.cancelled.inc()
                free = len(session.free_rows())
                admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                waiting = bool(self._waiting)
                m.queue_depth.set(len(self._waiting))
                for request in admitted:
                    self._requests[request.prompt.item] = request
            if admitted:
                refills = session.counters.refills
                session.admit(deque(r.prompt for r in admitted), 1)
                m.refills.inc(session.counters.refills - refills)
            live = session.live
            m.busy.set(live)
            if not live:
                continue
            answers, partial = session.decode(self.steps, 1 if waiting else live, progress=True)
            m.decode_calls.inc()
            m.compiled.set(self.pg.continuous.traces)
            now = time.perf_counter()
            with self._lock:  # a request cancelled during the call is told nothing more
                ended = [(self._requests.pop(a.item, None), a.tokens, a.logprobs, a.stop_reason) for a in answers]
                going = [(self._requests.get(p.item), p.tokens, p.logprobs, None) for p in partial]
            m.busy.set(session.live)
            for request, tokens, logprobs, reason in ended + going:
                if request is None or (reason is None and len(tokens) <= request.sent):
                    continue
                if request.sent == 0:
                    m.ttft.observe(now - request.arrived)
                m.add_tokens(len(tokens) - request.sent, now)
                request.sent = len(tokens)
                if reason is not None:
                    m.latency.observe(now - request.arrived)
                request.deliver(Event(tokens, logprobs, reason))

    def _warm_up(self) -> None:
        """Every program a request can need, compiled by running it: each refill size of each
        prompt bucket (dummy prompts of one token to answer), then a decode call."""
        cfg, shape = self.pg.config, self.shape
        session = Session(self.pg.continuous, self.pg.params, shape, GenerationConfig())
        pixels = np.zeros((cfg.image_size, cfg.image_size, 3), self.pg.dtype)
        text = MIN_TEXT_BUCKET
        while cfg.num_image_tokens + text <= shape.prompt:
            ids = [cfg.image_token_id] * cfg.num_image_tokens + [cfg.bos_token_id] * text
            padded = pad_prompt(cfg, ids, [0] * len(ids))
            for size in (1 << b for b in range(shape.rows.bit_length())):  # powers of two up to rows
                prompts = deque(Prompt(i, pixels, *padded, 1) for i in range(size))
                session.admit(prompts, 1)
                session.decode(1, session.live or 1)
            text *= 2
