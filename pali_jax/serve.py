"""Serve PaliGemma over HTTP: an OpenAI-compatible endpoint on the continuous decoder.

    pali-jax serve --model MODEL [--seg-vae vae-oid.npz] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

(`python -m pali_jax.serve ...` runs the same.) `POST /v1/chat/completions` takes one user message
holding an image (a `data:` URL; a local path only under --image-root; remote URLs are never
fetched) and a PaliGemma prompt (`caption en`, `answer en ...`, `detect cat ; dog`, `segment cat`),
and answers in OpenAI's format, streamed (server-sent events) or whole; `<loc>` / `<seg>` tokens
stay in the text and come parsed in `message.detections` (`pali_jax.openai_api`). `GET /v1/models`,
`GET /health` (200 once every program is compiled) and `GET /metrics` (Prometheus).

Every request shares the decoder's slots (`pali_jax.engine`): it waits in a bounded queue (full:
429 with Retry-After) and joins decoding as soon as a slot frees. Bodies and images over the
limits get 413, every malformed request 400 in OpenAI's error JSON; a client that goes away frees
its slot at the next decode call; a request that runs past --request-timeout ends with 504. SIGTERM
(or Ctrl-C) stops accepting connections, finishes the answers in flight for up to
--shutdown-timeout seconds, then exits (0 for SIGTERM). docs/serving.md has the details.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m pali_jax.serve: `pali-jax serve`
    from pali_jax.cli import console

    sys.exit(console("serve"))

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pali_jax import openai_api as api
from pali_jax.continuous import Prompt, Sampling, pad_prompt, slot_shape
from pali_jax.decode import StopReason
from pali_jax.engine import Engine, Event, NotServing, QueueFull
from pali_jax.errors import UserError
from pali_jax.generation_config import GenerationConfig
from pali_jax.processor import (
    ImageTooLarge,
    ProcessorError,
    load_image_bytes,
    preprocess_images,
)

if TYPE_CHECKING:
    from pali_jax.pretrained import PaliGemma

log = logging.getLogger(__name__)

MAX_PORT = 65535
# Request bodies parsed and images decoded at once: each image may be tens of megapixels, and
# every thread that ever decodes one keeps its own malloc arena (resident memory) afterwards.
IMAGE_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Options:
    """How the server answers; `Limits` are what one request may ask for."""

    model_name: str
    limits: api.Limits = dataclasses.field(default_factory=api.Limits)
    api_key: str | None = None
    request_timeout_s: float = 60.0
    retry_after_s: int = 1  # what a 429 / 503 tells the client
    temperature: float = 0.0  # defaults of requests that give none
    top_p: float = 1.0
    top_k: int = 0  # every request's (OpenAI has no top_k)
    seed: int | None = None  # None: a random seed for each request that gives none


class _Gone(Exception):
    """The client disconnected."""


class Server:
    """The ASGI application (`app`) of one loaded model and its engine."""

    def __init__(self, pg: PaliGemma, engine: Engine, options: Options):
        self.pg, self.engine, self.options = pg, engine, options
        self.draining = False
        self._images = anyio.CapacityLimiter(IMAGE_THREADS)
        self._to_thread = anyio.to_thread.run_sync

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            self.draining = True
            await self._to_thread(self.engine.stop)

        app = FastAPI(title="pali-jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
        self.app = app

        def error_response(e: api.APIError) -> JSONResponse:
            self.engine.metrics.requests.labels(str(e.status)).inc()
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(api.APIError)
        async def _api_error(request, e: api.APIError):
            return error_response(e)

        @app.exception_handler(HTTPException)
        async def _http_error(request, e: HTTPException):  # unknown paths, wrong methods
            return error_response(api.APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                               else None, headers=dict(e.headers or {})))

        @app.exception_handler(RequestValidationError)
        async def _validation_error(request, e):
            return error_response(api.bad(" ".join(str(e).split())[:300]))

        @app.exception_handler(Exception)
        async def _bug(request, e: Exception):
            log.exception("unexpected error answering %s", request.url.path)
            return error_response(api.APIError(500, f"internal error: {type(e).__name__}"))

        @app.get("/health")
        async def health():
            if self.engine.failed:
                return error_response(api.APIError(503, self.engine.failed))
            if not self.engine.serving or self.draining:
                state = "stopping" if self.draining else "compiling"
                return JSONResponse({"status": state}, status_code=503,
                                    headers={"Retry-After": str(options.retry_after_s)})
            return {"status": "ok", "model": options.model_name}

        @app.get("/metrics")
        async def metrics(request: Request):
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._authorize(request)
            return Response(generate_latest(self.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str, request: Request):
            self._authorize(request)
            if name != options.model_name:
                raise api.APIError(404, f"model {name!r} does not exist", code="model_not_found", param="model")
            return self._model_card()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._chat(request)

    def _model_card(self) -> dict:
        return {"id": self.options.model_name, "object": "model", "created": 0, "owned_by": "pali-jax"}

    def _authorize(self, request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise api.APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def _unavailable(self, why: str) -> api.APIError:
        return api.APIError(503, why, headers={"Retry-After": str(self.options.retry_after_s)})

    async def _body(self, request) -> bytes:
        """The body, refused (413) past the limit from its Content-Length or as it arrives."""
        limit = self.options.limits.max_body_bytes
        too_big = api.APIError(413, f"the request body is over {limit:,} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_big if length.isdigit() else api.bad("bad Content-Length")
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise too_big
            chunks.append(piece)
        return b"".join(chunks)

    # -- one request ---------------------------------------------------------------------------
    def _prepare(self, raw: bytes) -> tuple[api.ChatRequest, Prompt, tuple[int, int], int]:
        """(the request, its prompt for the engine, the image's (width, height), prompt tokens),
        from the body: on a worker thread (one hop per request: each wakes a thread that then
        competes for the GIL with the event loop and the decoding thread)."""
        cfg, limits = self.pg.config, self.options.limits
        req = api.parse_chat_request(raw, limits)
        if req.model != self.options.model_name:
            raise api.APIError(404, f"model {req.model!r} does not exist; this server has {self.options.model_name!r}",
                               param="model", code="model_not_found")
        try:
            ids, types = self.pg.tokenizer.encode_example(req.prompt, num_image_tokens=cfg.num_image_tokens)
        except ProcessorError as e:
            raise api.bad(f"the prompt: {e}", "messages") from None
        text = len(ids) - cfg.num_image_tokens
        if text > limits.max_prompt_tokens:
            raise api.bad(f"the prompt is {text} tokens (<bos> and the newline included), over the server's "
                          f"--max-prompt-tokens {limits.max_prompt_tokens}", "messages", "context_length_exceeded")
        try:
            GenerationConfig(max_new_tokens=req.max_tokens).check_prompt_length(cfg, len(ids))
        except UserError as e:
            raise api.bad(str(e), "messages", "context_length_exceeded") from None
        try:
            image = load_image_bytes(req.image, req.image_name, limits.max_image_pixels)
        except ImageTooLarge as e:
            raise api.APIError(413, str(e), param="messages") from None
        except ProcessorError as e:
            raise api.bad(str(e), "messages") from None
        pixels = preprocess_images([image], cfg.image_size)[0].astype(self.pg.dtype)
        prompt = Prompt(0, pixels, *pad_prompt(cfg, ids, types), req.max_tokens, ignore_stop_tokens=req.ignore_eos)
        return req, prompt, image.size, len(ids)

    def _sampling(self, req: api.ChatRequest) -> Sampling:
        """The request's sampler: its own settings, else the server's (--temperature, --top-p,
        --top-k; greedy by default); its seed, else --seed, else a random one."""
        o = self.options
        seed = next((s for s in (req.seed, o.seed) if s is not None), None)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed  # < 2**32: a host-made key
        temperature = o.temperature if req.temperature is None else req.temperature
        top_p = o.top_p if req.top_p is None else req.top_p
        return Sampling(temperature, o.top_k, top_p, GenerationConfig(seed=seed).prng_key())

    async def _chat(self, request):
        t0 = time.perf_counter()
        self._authorize(request)
        if self.draining:
            raise self._unavailable("the server is shutting down")
        if self.engine.failed:
            raise api.APIError(503, self.engine.failed)
        if not self.engine.serving:
            raise self._unavailable("the server is compiling its programs; retry shortly (GET /health)")
        raw = await self._body(request)
        req, prompt, size, prompt_tokens = await self._to_thread(self._prepare, raw, limiter=self._images)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            item = self.engine.submit(prompt, self._sampling(req), lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except QueueFull as e:
            raise api.APIError(429, f"the server is busy: {e}; retry later", code="queue_full",
                               headers={"Retry-After": str(self.options.retry_after_s)}) from None
        except NotServing as e:
            raise self._unavailable(str(e)) from None
        deadline = loop.time() + self.options.request_timeout_s - (time.perf_counter() - t0)
        answer = _Answer(self, req, item, size, prompt_tokens, events, deadline)
        if req.stream:
            self.engine.metrics.requests.labels("200").inc()
            return _EventStream(answer)
        try:
            body = await answer.whole(request.receive)
        except _Gone:
            self.engine.metrics.requests.labels("499").inc()
            return Response(status_code=499)  # nobody reads it
        self.engine.metrics.requests.labels("200").inc()
        return JSONResponse(body)


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the body is read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Answer:
    """One request's answer as the engine's events come: text (stop strings applied), finish,
    detections, usage."""

    def __init__(self, server: Server, req: api.ChatRequest, item: int, size: tuple[int, int], prompt_tokens: int,
                 events: asyncio.Queue, deadline: float):
        self.server, self.req, self.item, self.size, self.prompt_tokens = server, req, item, size, prompt_tokens
        self.events, self.deadline = events, deadline
        tokenizer = server.pg.tokenizer
        self.text = api.TextStream(tokenizer.decode, req.stop)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.reason: StopReason | None = None
        self.id, self.created = api.completion_id(), int(time.time())
        self._pieces = tokenizer.sp.id_to_piece
        self._eos = set(server.pg.config.eos_token_ids)

    async def follow(self, receive) -> AsyncIterator[tuple[str, list[dict] | None]]:
        """(new text, logprobs of the new tokens) after each event, until the answer ends (its
        slot is then freed if it was still decoding: a stop string, a timeout, the client gone)."""
        loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(_disconnected(receive))
        ended = False
        try:
            while True:
                get = asyncio.ensure_future(self.events.get())
                done, _ = await asyncio.wait({get, watcher}, timeout=max(0.0, self.deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if watcher in done:
                        raise _Gone
                    raise api.APIError(504, f"the answer took longer than the server's --request-timeout "
                                       f"{self.server.options.request_timeout_s:g} s", code="timeout")
                event = get.result()
                if event.error:
                    ended = True
                    raise self.server._unavailable(event.error)
                new = event.tokens[len(self.tokens):]
                self.tokens = event.tokens
                if event.logprobs is not None:
                    self.logprobs = event.logprobs
                piece = self.text.update(self.tokens, final=event.final)
                if event.final or self.text.stopped:
                    ended = event.final
                    self.reason = event.stop_reason or StopReason.STOP_TOKEN
                yield piece, self._logprobs(new, len(self.tokens) - len(new)) if self.req.logprobs else None
                if self.reason is not None:
                    return
        finally:
            watcher.cancel()
            if not ended:
                self.server.engine.cancel(self.item)

    def _logprobs(self, tokens: list[int], start: int) -> list[dict]:
        shown = [t for t in tokens if t not in self._eos]
        pieces = [self._pieces(t).replace("\u2581", " ") for t in shown]
        return api.token_logprobs(pieces, [self.logprobs[start + k] for k, t in enumerate(tokens)
                                           if t not in self._eos])

    @property
    def finish(self) -> str:
        return "length" if self.reason == StopReason.MAX_NEW_TOKENS and not self.text.stopped else "stop"

    async def detections(self) -> list[dict]:
        from pali_jax.detection import parse_detections
        from pali_jax.segmentation import rle_encode

        boxes = parse_detections(self.text.text, *self.size)
        decoder = self.server.pg.mask_decoder
        if decoder is not None and any(b.seg_codes is not None for b in boxes):
            [boxes] = await self.server._to_thread(decoder.add_masks, [boxes], [self.size])
        out = []
        for b in boxes:
            record = {"label": b.label, "box": [b.xmin, b.ymin, b.xmax, b.ymax]}
            if b.mask is not None:
                record["mask"] = rle_encode(b.mask)
            out.append(record)
        return out

    def usage(self) -> dict:
        return api.usage(self.prompt_tokens, len(self.tokens))

    async def whole(self, receive) -> dict:
        logprobs: list[dict] = []
        async with contextlib.aclosing(self.follow(receive)) as pieces:
            async for _, lp in pieces:
                logprobs += lp or []
        return api.completion(self.id, self.req.model, self.text.text, await self.detections(), self.finish,
                              self.usage(), logprobs if self.req.logprobs else None)

    async def stream(self, receive) -> AsyncIterator[bytes]:
        model, chunk = self.req.model, api.chunk
        yield chunk(self.id, model, self.created, {"role": "assistant", "content": ""})
        try:
            async with contextlib.aclosing(self.follow(receive)) as pieces:
                async for piece, lp in pieces:
                    if piece or lp:
                        yield chunk(self.id, model, self.created, {"content": piece}, logprobs=lp)
            yield chunk(self.id, model, self.created, {"detections": await self.detections()}, self.finish)
            if self.req.include_usage:
                yield chunk(self.id, model, self.created, {}, use=self.usage())
        except api.APIError as e:  # the headers are out: the error goes in the stream
            self.server.engine.metrics.requests.labels(str(e.status)).inc()
            yield api.error_event(e)
        yield api.DONE


class _EventStream(Response):
    """Server-sent events of one answer; a client that goes away ends it (and frees its slot)."""

    media_type = "text/event-stream"

    def __init__(self, answer: _Answer):  # no Content-Length: the body is as long as the answer
        self.status_code, self.background, self.answer = 200, None, answer
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async with contextlib.aclosing(self.answer.stream(receive)) as events:
                async for data in events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (_Gone, OSError, ClientDisconnect):
            pass


# -- building a server -----------------------------------------------------------------------------
def make_engine(pg: PaliGemma, *, slots: int = 8, max_prompt_tokens: int = 64, max_tokens: int = 32,
                queue_size: int = 64, steps: int = 8, spare_slots: int | None = None) -> Engine:
    """The engine for `pg`: `slots` decode rows, prompts of at most `max_prompt_tokens` text
    tokens, answers of at most `max_tokens`, `queue_size` requests waiting, `steps` per decode call."""
    for name, value, low, high in (("max_prompt_tokens", max_prompt_tokens, 1, 1 << 16), ("queue_size", queue_size,
                                   1, 1 << 16), ("decode_steps", steps, 1, 1024)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UserError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    cfg = pg.config
    GenerationConfig(max_new_tokens=max_tokens).check_model(cfg)
    GenerationConfig(max_new_tokens=max_tokens).check_prompt_length(cfg, cfg.num_image_tokens + max_prompt_tokens)
    shape = slot_shape(cfg, slots, cfg.num_image_tokens + max_prompt_tokens, max_tokens, spare_slots, logprobs=True)
    pg.continuous.check(shape)
    return Engine(pg, shape, queue_size=queue_size, steps=steps)


def make_server(pg: PaliGemma, options: Options, *, warm_up: bool = True, **engine: Any) -> Server:
    """A server for `pg` with its engine started (compiling in the background: `/health` says when
    it is ready). `engine`: `make_engine`'s keywords."""
    limits = options.limits
    engine_ = make_engine(pg, max_prompt_tokens=limits.max_prompt_tokens, max_tokens=limits.max_tokens, **engine)
    engine_.start(warm_up=warm_up)
    return Server(pg, engine_, options)


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv: list[str], prog: str = "pali-jax serve") -> argparse.Namespace:
    from pali_jax.cli import OneLineParser, add_generation_arguments
    from pali_jax.segmentation import resolve_vae_path

    p = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="converted dir, HF checkpoint dir or hub id")
    p.add_argument("--name", help="the model's name in the API (default: the --model argument)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $PALI_JAX_API_KEY, else none)")
    p.add_argument("--image-root", metavar="DIR", help="let requests name image files under DIR (default: data: "
                                                       "URLs only)")
    add_generation_arguments(p)
    p.set_defaults(seed=None)
    p.add_argument("--slots", type=int, default=8, help="decode rows shared by all requests")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per call: the streaming granularity "
                                                              "and the longest wait of a new request for a slot")
    p.add_argument("--max-prompt-tokens", type=int, default=api.Limits.max_prompt_tokens,
                   help="the longest prompt (text tokens, <bos> and newline included)")
    p.add_argument("--max-body-bytes", type=int, default=api.Limits.max_body_bytes)
    p.add_argument("--max-image-bytes", type=int, default=api.Limits.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=api.Limits.max_image_pixels)
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds from arrival to the last token")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for the answers in flight")
    p.add_argument("--max-connections", type=int, default=256, help="open connections at most (503 beyond)")
    p.add_argument("--no-warm-up", action="store_true", help="compile programs on first use (reported in /metrics) "
                                                             "instead of before /health is ready")
    args = p.parse_args(argv)
    if not 0 <= args.port <= MAX_PORT:
        p.error(f"--port must be in [0, {MAX_PORT}], got {args.port}")
    if args.beams != 1:
        p.error("--beams: the server decodes greedily or by sampling (continuous batching)")
    for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_connections"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("request_timeout", "shutdown_timeout"):
        value = getattr(args, name)
        if not 0 < value < 1e6:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1e6) seconds, got {value}")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        p.error(f"--image-root {args.image_root}: no such directory")
    args.api_key = args.api_key or os.environ.get("PALI_JAX_API_KEY") or None
    args.seg_vae = resolve_vae_path(args.seg_vae)
    return args


def _options(args: argparse.Namespace) -> Options:
    from pali_jax.cli import generation_config

    generation = generation_config(argparse.Namespace(**{**vars(args), "seed": args.seed or 0}))
    limits = api.Limits(args.max_body_bytes, args.max_image_bytes, args.max_image_pixels, args.max_prompt_tokens,
                        generation.max_new_tokens, Path(args.image_root) if args.image_root else None)
    return Options(args.name or args.model, limits, args.api_key, args.request_timeout,
                   temperature=generation.effective_temperature, top_p=generation.top_p or 1.0,
                   top_k=generation.top_k or 0, seed=args.seed)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from pali_jax.generate import enable_compilation_cache
    from pali_jax.pretrained import PaliGemma
    from pali_jax.sharding import mesh_from_args

    options = _options(args)
    mesh = mesh_from_args(args)
    if not args.no_compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    pg = PaliGemma.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, mask_decoder=args.seg_vae)
    server = make_server(pg, options, warm_up=not args.no_warm_up, slots=args.slots, queue_size=args.queue_size,
                         steps=args.decode_steps)
    config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            limit_concurrency=args.max_connections, timeout_graceful_shutdown=args.shutdown_timeout,
                            lifespan="on")

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            server.draining = True  # requests on open connections get 503 from now on
            super().handle_exit(sig, frame)

    # uvicorn raises the signal that stopped it again once it has shut down: SIGTERM's handler
    # must then do nothing (exit 0); Ctrl-C ends as every command's does (exit 130).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    print(f"serving {options.model_name} on http://{args.host}:{args.port} (compiling; GET /health says when "
          "ready)", file=sys.stderr, flush=True)
    Uvicorn(config).run()


def command(argv: list[str], prog: str = "pali-jax serve") -> None:
    """`pali-jax serve ARGS` (see the module docstring)."""
    run(parse_args(argv, prog))
