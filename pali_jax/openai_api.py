"""OpenAI's chat completions format for PaliGemma: requests checked into `ChatRequest`, answers and
stream chunks as OpenAI's JSON, every refusal as OpenAI's error JSON (`APIError`).

A request is one user message whose content holds one `image_url` part and one `text` part, the
PaliGemma prompt (`caption en`, `answer en ...`, `detect cat ; dog`, `segment cat`); no chat
template is applied. The answer's `message.content` keeps `<loc>` / `<seg>` tokens as text, and
`message.detections` carries them parsed: `[{label, box: [x0, y0, x1, y1] in the image's pixels,
mask: COCO RLE}]` (a mask when the server has a mask decoder and the answer has `<seg>` codes).

Images come as `data:` URLs (base64), or as local paths / `file://` URLs only under the server's
`--image-root`; a remote URL is never fetched. Everything here is pure (no model, no I/O but the
`--image-root` file read): `pali_jax.serve` wires it to the engine.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_SEED = 2**63
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Options OpenAI defines that PaliGemma's server cannot honour: refused when set to anything but
# their neutral value, so that a client never silently gets something else than it asked for.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "audio": (None,), "modalities": (None, ["text"]),
               "prediction": (None,)}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (docs/errors.md lists them with their flags)."""

    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000
    max_prompt_tokens: int = 64  # text tokens after the image tokens (<bos> and the newline included)
    max_tokens: int = 32  # the largest max_tokens; also the default
    image_root: Path | None = None


class APIError(Exception):
    """A refusal as OpenAI's error JSON: `status` (4xx), message, type, the parameter it names,
    a code, and extra headers (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}.get(
                                 status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A checked request: the image's bytes (decoded from its data: URL or read under the image
    root), the prompt and the options."""

    model: str
    image: bytes
    image_name: str  # for messages
    prompt: str
    max_tokens: int
    temperature: float | None  # None: the server's default (greedy unless --temperature); 0: greedy
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    logprobs: bool
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # vLLM's extension: answer max_tokens tokens (load tests)


def _typed(body: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int: true must not pass as max_tokens=1
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(f"'{name}' must be {what}, got {json.dumps(value)[:40]}", name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = _typed(body, name, (int, float), "a number")
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise bad(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def parse_chat_request(raw: bytes, limits: Limits) -> ChatRequest:
    """The request body checked: every mistake a 400 (413 for an image over the limits) naming
    the parameter, never anything else."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"the body is not JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, got {type(body).__name__}")
    model = _typed(body, "model", (str,), "a string")
    if model is None:
        raise bad("'model' is required (GET /v1/models lists it)", "model")
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise bad(f"'{name}' is not supported by this PaliGemma server", name)
    n = _typed(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise bad(f"'n' must be 1 (one answer per request), got {n}", "n")
    fmt = _typed(body, "response_format", (dict,), "an object")
    if fmt is not None and fmt.get("type") != "text":
        raise bad("'response_format' must be {\"type\": \"text\"}: PaliGemma answers plain text", "response_format")
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, limit_name, (int,), "an integer", limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise bad(f"'{limit_name}' must be in [1, {limits.max_tokens}] (the server's --max-tokens), got {max_tokens}",
                  limit_name)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise bad("'top_p' must be in (0, 1]", "top_p")
    seed = _typed(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise bad(f"'seed' must be in [0, 2**63), got {seed}", "seed")
    stop = _typed(body, "stop", (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop):
        raise bad(f"'stop' must be at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} "
                  "characters", "stop")
    logprobs = _typed(body, "logprobs", (bool,), "a boolean", False)
    top = _typed(body, "top_logprobs", (int,), "an integer", 0)
    if top:
        raise bad("'top_logprobs' is not supported (logprobs: true gives each chosen token's)", "top_logprobs")
    stream = _typed(body, "stream", (bool,), "a boolean", False)
    options = _typed(body, "stream_options", (dict,), "an object", {})
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    ignore_eos = _typed(body, "ignore_eos", (bool,), "a boolean", False)
    image, name, prompt = _message(body.get("messages"), limits)
    return ChatRequest(model, image, name, prompt, max_tokens, temperature, top_p, seed, tuple(stop), logprobs,
                       stream, usage, ignore_eos)


def _message(messages: Any, limits: Limits) -> tuple[bytes, str, str]:
    """(image bytes, its name, prompt) of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role: unknown role {json.dumps(role)[:40]}", "messages")
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise bad("PaliGemma answers one user message (an image and a prompt): no system prompt, chat history or "
                  f"chat template; got roles {[m['role'] for m in messages]}", "messages")
    content = messages[0].get("content")
    if not isinstance(content, list):
        raise bad("messages[0].content must be a list of parts: one image_url and one text", "messages")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                and isinstance(part["image_url"].get("url"), str):
            images.append(part["image_url"]["url"])
        else:
            raise bad(f"messages[0].content[{j}] must be {{\"type\": \"text\", \"text\": str}} or "
                      "{\"type\": \"image_url\", \"image_url\": {\"url\": str}}", "messages")
    if len(texts) != 1 or len(images) != 1:
        raise bad(f"messages[0].content needs exactly one image_url and one text part, got {len(images)} and "
                  f"{len(texts)}", "messages")
    data, name = image_bytes(images[0], limits)
    return data, name, texts[0]


def image_bytes(url: str, limits: Limits) -> tuple[bytes, str]:
    """The bytes of a `data:` URL, or of a file under `limits.image_root`; never a remote fetch."""
    if url.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        parts = header.split(";")
        if not comma or "base64" not in parts[1:]:
            raise bad("image_url: a data: URL must be base64 (data:image/png;base64,...)", "messages")
        if parts[0] and not parts[0].startswith("image/"):
            raise bad(f"image_url: media type {parts[0][:40]!r} is not an image", "messages")
        if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
            raise APIError(413, f"image_url: the image is over {limits.max_image_bytes:,} bytes", param="messages")
        try:
            return base64.b64decode(payload, validate=True), "in image_url"
        except (binascii.Error, ValueError):
            raise bad("image_url: the data: URL is not valid base64", "messages") from None
    scheme = url.split(":", 1)[0].lower() if ":" in url.split("/", 1)[0] else ""
    if scheme and scheme != "file":
        raise bad(f"image_url: {scheme}: URLs are never fetched by this server; send the image as a data: URL",
                  "messages")
    if limits.image_root is None:
        raise bad("image_url: local paths are refused (the server has no --image-root); send a data: URL",
                  "messages")
    path = url[len("file://"):] if scheme else url
    root = limits.image_root.resolve()
    target = (root / path).resolve()  # an absolute path stays itself; .. and symlinks are followed
    if not target.is_relative_to(root):
        raise bad("image_url: the path is outside the server's --image-root", "messages")
    try:
        with open(target, "rb") as f:
            if os.fstat(f.fileno()).st_size > limits.max_image_bytes:
                raise APIError(413, f"image_url: the image is over {limits.max_image_bytes:,} bytes",
                               param="messages")
            return f.read(limits.max_image_bytes + 1), str(Path(path))
    except OSError:
        raise bad(f"image_url: no readable file {path!r} under the --image-root", "messages") from None


class TextStream:
    """An answer's text as its tokens come: `update(tokens)` gives the new text that is safe to
    show (never a piece that a later token could turn into a stop string, nor half a character)
    and whether a stop string ended it (the text is then cut before it, as OpenAI does)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]):
        self.decode, self.stops = decode, stops
        self.text = ""  # shown so far
        self.stopped = False

    def update(self, tokens: list[int], final: bool = False) -> str:
        text = self.decode(tokens)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.stopped, final = text[: min(cuts)], True, True
        if not final:
            if text.endswith("\ufffd"):  # a multi-byte character in pieces
                text = text.rstrip("\ufffd")
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
        if not text.startswith(self.text) or len(text) <= len(self.text):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def token_logprobs(pieces: list[str], logprobs: list[float]) -> list[dict]:
    return [{"token": p, "logprob": float(lp), "bytes": list(p.encode()), "top_logprobs": []}
            for p, lp in zip(pieces, logprobs)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, content: str, detections: list[dict], finish: str, use: dict,
               logprobs: list[dict] | None) -> dict:
    message = {"role": "assistant", "content": content, "detections": detections}
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish,
                         "logprobs": None if logprobs is None else {"content": logprobs}}],
            "usage": use}


def chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None,
          logprobs: list[dict] | None = None, use: dict | None = None) -> bytes:
    """One server-sent event in OpenAI's chunk format (`use`: the usage chunk, with no choices)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    if use is not None:
        body.update(choices=[], usage=use)
    else:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish,
                            "logprobs": None if logprobs is None else {"content": logprobs}}]
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def error_event(error: APIError) -> bytes:
    """An error inside a stream (its headers are sent): the openai client raises it."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
