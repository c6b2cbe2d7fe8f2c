"""`pali-jax serve`: the official `openai` client against the server on the bundled demo model.

Answers equal `pg.generate` on the same image alone (captions, colours, boxes), whole and streamed;
the request options (max_tokens, stop, logprobs, seed); hostile requests each a 4xx in OpenAI's
error JSON with valid requests answered between them; a full queue 429; a timeout 504; a streaming
client killed mid-answer frees its slot (`/metrics`); SIGTERM under load finishes the answers in
flight and exits 0. The servers run in threads of this process (one model, its programs compiled
once); the SIGTERM test runs the command in a subprocess.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import PIL.Image
import pytest
import uvicorn
from hostile import png_header

from pali_jax import cli
from pali_jax.demo import shapes
from pali_jax.openai_api import Limits
from pali_jax.pretrained import PaliGemma
from pali_jax.serve import Options, Server, make_engine, make_server

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"
NAME = "demo"
SLOTS = 4
LIMITS = {"max_prompt_tokens": 16, "max_tokens": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """An ASGI app served by uvicorn on a thread of this process."""

    def __init__(self, server: Server):
        self.server, self.port = server, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(server.app, host="127.0.0.1", port=self.port, log_level="error", lifespan="on")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("the server never became ready")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {m[0]: float(m[1]) for m in re.findall(r"^(pali_jax_\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)}

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def demo() -> PaliGemma:
    return PaliGemma.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """12 shapes images as PNG files."""
    folder = tmp_path_factory.mktemp("shapes")
    for i, scene in enumerate(shapes.scenes(12, seed=5)):
        PIL.Image.fromarray(shapes.render(scene)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.json").write_text(json.dumps([p for p, _ in shapes.prompts(scene)]))
    return folder


@pytest.fixture(scope="module")
def server(demo, image_root):
    limits = Limits(image_root=image_root, max_body_bytes=4 << 20, **LIMITS)
    running = Running(make_server(demo, Options(NAME, limits), slots=SLOTS,
                                  queue_size=16, steps=4))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def slow(demo, server):
    """One token per decode call and room for one waiting request (the programs are the first
    server's: same slot shape)."""
    running = Running(make_server(demo, Options(NAME, Limits(**LIMITS)), warm_up=False, slots=SLOTS, queue_size=1,
                                  steps=1))
    yield running
    running.stop()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def message(url: str, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]


def ask(client: openai.OpenAI, path: Path, prompt: str, **options):
    return client.chat.completions.create(model=NAME, messages=message(data_url(path), prompt), **options)


def cases(image_root: Path) -> list[tuple[Path, str]]:
    """Every image with each of its prompts in turn: captions, colour questions, detections."""
    out = []
    for i, path in enumerate(sorted(image_root.glob("*.png"))):
        prompts = json.loads(path.with_suffix(".json").read_text())
        out += [(path, prompts[i % len(prompts)]), (path, prompts[-1])]
    return out


def test_answers_equal_generate_alone(demo, server, image_root):
    """24 requests from 6 clients at once: each answer is `pg.generate` on its image alone, text,
    boxes (in the image's pixels) and token count."""
    todo = cases(image_root)
    assert {p.split()[0] for _, p in todo} >= {"caption", "answer", "detect"}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda case: ask(server.client(), *case), todo))
    for (path, prompt), answer in zip(todo, answers):
        [want] = demo.generate(str(path), prompt, max_new_tokens=LIMITS["max_tokens"])
        choice = answer.choices[0]
        assert choice.message.content == want.text, (path, prompt)
        assert choice.message.detections == [{"label": b.label, "box": [b.xmin, b.ymin, b.xmax, b.ymax]}
                                             for b in want.boxes]
        assert choice.finish_reason == "stop" and answer.usage.completion_tokens == len(want.token_ids)
        assert answer.usage.prompt_tokens == len(demo.tokenizer.encode_example(
            prompt, num_image_tokens=demo.config.num_image_tokens)[0])
    assert any(a.choices[0].message.detections for a in answers)


def test_stream_gives_the_same_answer(demo, server, image_root):
    for path, prompt in cases(image_root)[:4]:
        chunks = list(ask(server.client(), path, prompt, stream=True, stream_options={"include_usage": True}))
        whole = ask(server.client(), path, prompt)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        last = [c for c in chunks if c.choices][-1]
        assert last.choices[0].finish_reason == "stop"
        assert last.choices[0].delta.detections == whole.choices[0].message.detections
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_request_options(demo, server, image_root):
    path = min(image_root.glob("*.png"))
    client = server.client()
    [want] = demo.generate(str(path), "caption en", max_new_tokens=64)
    words = want.text.split()
    short = ask(client, path, "caption en", max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert want.text.startswith(short.choices[0].message.content)
    stopped = ask(client, path, "caption en", stop=[" " + words[2]])
    assert stopped.choices[0].message.content == " ".join(words[:2])
    assert stopped.choices[0].finish_reason == "stop"
    streamed = ask(client, path, "caption en", stop=" " + words[2], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == " ".join(words[:2])
    scored = ask(client, path, "caption en", logprobs=True)
    entries = scored.choices[0].logprobs.content
    assert len(entries) == len(want.token_ids) - 1  # the EOS is not shown
    assert "".join(e.token for e in entries).strip() == want.text and all(e.logprob <= 0 for e in entries)
    sampled = [ask(client, path, "answer en", temperature=2.0, seed=s, logprobs=True) for s in (1, 1, 2, 3)]
    tokens = [[e.token for e in a.choices[0].logprobs.content] for a in sampled]
    assert tokens[0] == tokens[1] and tokens[0] not in tokens[2:], tokens
    long = long_answer(client, path)
    assert long.usage.completion_tokens == 64 and long.choices[0].finish_reason == "length"


def test_models_health_metrics_and_image_root(server, image_root):
    client = server.client()
    assert [m.id for m in client.models.list()] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    metrics = server.metrics()
    for name in ("pali_jax_queue_depth", "pali_jax_slots_busy", "pali_jax_tokens_per_second",
                 "pali_jax_programs_compiled", "pali_jax_time_to_first_token_seconds_count",
                 "pali_jax_request_latency_seconds_count"):
        assert name in metrics, name
    assert metrics["pali_jax_slots"] == SLOTS and metrics["pali_jax_generated_tokens_total"] > 0
    # a file under --image-root: the same answer as its bytes
    path = sorted(image_root.glob("*.png"))[1]
    by_path = client.chat.completions.create(model=NAME, messages=message(path.name, "caption en"))
    assert by_path.choices[0].message.content == ask(client, path, "caption en").choices[0].message.content
    # the programs were all compiled before /health said ok: the requests compiled nothing
    assert server.metrics()["pali_jax_programs_compiled"] == metrics["pali_jax_programs_compiled"]


def _hostile(image_root: Path, tmp: Path) -> dict[str, tuple[int, dict | bytes]]:
    """name: (status, body). Bodies are JSON objects (sent as JSON) or raw bytes."""
    good = data_url(min(image_root.glob("*.png")))
    ok = {"model": NAME, "messages": message(good, "caption en")}

    def but(**change):
        return {**ok, **change}

    text = base64.b64encode(b"not an image at all").decode()
    bomb = base64.b64encode(png_header(tmp / "bomb.png", 20000, 20000).read_bytes()).decode()
    big = PIL.Image.new("RGB", (7000, 6000))
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    over = base64.b64encode(buffer.getvalue()).decode()
    return {
        "not json": (400, b"{\"model\": "), "not utf-8": (400, b"\xff\xfe{}"), "a list": (400, b"[1, 2]"),
        "no model": (400, {"messages": ok["messages"]}), "unknown model": (404, but(model="gpt-4")),
        "model a number": (400, but(model=3)), "no messages": (400, but(messages=None)),
        "messages a string": (400, but(messages="hi")), "empty messages": (400, but(messages=[])),
        "unknown role": (400, but(messages=[{"role": "wizard", "content": "x"}])),
        "system message": (400, but(messages=[{"role": "system", "content": "x"}, *ok["messages"]])),
        "history": (400, but(messages=ok["messages"] * 2)),
        "text content": (400, but(messages=[{"role": "user", "content": "caption en"}])),
        "no image": (400, but(messages=[{"role": "user", "content": [{"type": "text", "text": "caption en"}]}])),
        "two images": (400, but(messages=[{"role": "user", "content": [*ok["messages"][0]["content"],
                                                                        ok["messages"][0]["content"][0]]}])),
        "part not an object": (400, but(messages=[{"role": "user", "content": [1, 2]}])),
        "bad base64": (400, but(messages=message("data:image/png;base64,@@@@", "caption en"))),
        "not base64": (400, but(messages=message("data:image/png,abc", "caption en"))),
        "not an image type": (400, but(messages=message("data:text/plain;base64," + text, "caption en"))),
        "not an image": (400, but(messages=message("data:image/png;base64," + text, "caption en"))),
        "remote url": (400, but(messages=message("https://example.com/cat.jpg", "caption en"))),
        "outside the root": (400, but(messages=message("../../etc/passwd", "caption en"))),
        "absolute path": (400, but(messages=message("/etc/passwd", "caption en"))),
        "missing file": (400, but(messages=message("nope.png", "caption en"))),
        "image prompt": (400, but(messages=message(good, "caption <image>"))),
        "prompt too long": (400, but(messages=message(good, "answer en " + "what is red " * 40))),
        "n 2": (400, but(n=2)), "max_tokens 0": (400, but(max_tokens=0)),
        "max_tokens too many": (400, but(max_tokens=10_000)), "max_tokens a string": (400, but(max_tokens="5")),
        "max_tokens true": (400, but(max_tokens=True)), "temperature -1": (400, but(temperature=-1)),
        "temperature NaN": (400, b'{"model": "demo", "temperature": NaN, "messages": []}'),
        "top_p 0": (400, but(top_p=0)), "top_p 2": (400, but(top_p=2)), "seed -1": (400, but(seed=-1)),
        "seed huge": (400, but(seed=2**70)), "stop a number": (400, but(stop=5)),
        "five stops": (400, but(stop=["a", "b", "c", "d", "e"])), "empty stop": (400, but(stop=[""])),
        "stream a string": (400, but(stream="yes")), "tools": (400, but(tools=[{"type": "function"}])),
        "top_logprobs": (400, but(logprobs=True, top_logprobs=3)),
        "json response": (400, but(response_format={"type": "json_object"})),
        "deep nesting": (400, b"[" * 100_000 + b"]" * 100_000),
        "image over the pixel limit": (413, but(messages=message("data:image/png;base64," + over, "caption en"))),
        "decompression bomb": (413, but(messages=message("data:image/png;base64," + bomb, "caption en"))),
        "body over the limit": (413, b"{" + b" " * (4 << 20) + b"}"),
    }


def test_hostile_requests_are_4xx_and_valid_ones_still_answered(demo, server, image_root, tmp_path):
    good = {"model": NAME, "messages": message(data_url(min(image_root.glob("*.png"))), "caption en")}
    want = demo.generate(str(min(image_root.glob("*.png"))), "caption en", max_new_tokens=64)[0].text
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, (status, body) in _hostile(image_root, tmp_path).items():
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.text[:300])
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"], name
            assert "\n" not in error["message"] and "Traceback" not in error["message"], name
            assert http.post("/v1/chat/completions", json=good).json()["choices"][0]["message"]["content"] == want
        for method, path, status in (("GET", "/v1/chat/completions", 405), ("GET", "/v2/nothing", 404),
                                     ("POST", "/v1/models", 405), ("GET", "/v1/models/other", 404)):
            r = http.request(method, path)
            assert r.status_code == status and r.json()["error"]["message"], (method, path, r.text)
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key(demo, server):
    secured = Running(Server(demo, server.server.engine, Options(NAME, Limits(**LIMITS), api_key="s3cret")))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=secured.url + "/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=secured.url + "/v1", api_key="s3cret", max_retries=0).models.list()
        assert [m.id for m in models] == [NAME]
        assert httpx.get(secured.url + "/metrics").status_code == 401
        assert httpx.get(secured.url + "/health").status_code == 200  # probes need no key
    finally:
        secured.stop()


def long_answer(client: openai.OpenAI, path: Path, **options):
    """An answer of max_tokens (64) tokens whatever they are (vLLM's `ignore_eos`)."""
    return ask(client, path, "caption en", max_tokens=64, extra_body={"ignore_eos": True}, **options)


def test_full_queue_is_429_with_retry_after(slow, image_root):
    path = min(image_root.glob("*.png"))

    def one(_):
        try:
            return long_answer(slow.client(), path).choices[0].finish_reason
        except openai.RateLimitError as e:
            assert e.response.headers["retry-after"] == "1" and e.body["type"] == "rate_limit_error"
            return 429

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    assert outcomes.count(429) >= 1 and outcomes.count("length") >= 1, outcomes
    assert outcomes.count(429) + outcomes.count("length") == len(outcomes)


def test_client_killed_mid_answer_frees_its_slot(slow, image_root):
    path = min(image_root.glob("*.png"))
    before = slow.metrics().get("pali_jax_cancelled_total", 0.0)
    stream = long_answer(slow.client(), path, stream=True)
    pieces = [next(stream) for _ in range(3)]
    assert pieces[-1].choices[0].finish_reason is None
    stream.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = slow.metrics()
        if metrics.get("pali_jax_cancelled_total", 0.0) > before and metrics["pali_jax_slots_busy"] == 0:
            break
        time.sleep(0.02)
    assert metrics["pali_jax_cancelled_total"] == before + 1 and metrics["pali_jax_slots_busy"] == 0
    assert long_answer(slow.client(), path).choices[0].finish_reason == "length"  # still serving


def test_timeout_is_504_and_frees_the_slot(demo, slow, image_root):
    hasty = Running(Server(demo, slow.server.engine, Options(NAME, Limits(**LIMITS), request_timeout_s=1e-3)))
    try:
        with pytest.raises(openai.APIStatusError) as e:
            long_answer(hasty.client(), min(image_root.glob("*.png")))
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        deadline = time.monotonic() + 30
        while slow.metrics()["pali_jax_slots_busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.metrics()["pali_jax_slots_busy"] == 0
    finally:
        hasty.stop()


def test_engine_arguments_are_checked(demo):
    for bad in ({"queue_size": 0}, {"steps": 0}, {"max_tokens": 10_000}, {"max_prompt_tokens": 1000}, {"slots": 0}):
        with pytest.raises(ValueError, match="must|exceed|too long"):
            make_engine(demo, **bad)


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--beams", "2"], "--beams: the server decodes greedily or by sampling"),
    (["--image-root", "/no/such/dir"], "--image-root /no/such/dir: no such directory"),
    (["--request-timeout", "0"], "--request-timeout must be in (0, 1e6)"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
])
def test_bad_flags_are_one_line(capsys, args, message):
    code = cli.main(["serve", "--model", str(DEMO_MODEL), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_sigterm_under_load_finishes_answers_and_exits_0(image_root):
    """The command in a subprocess: four long streamed answers in flight, then SIGTERM; each
    answer completes, a new request is refused, the process exits 0."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # XLA_FLAGS: conftest's cheap code generation
    process = subprocess.Popen(
        [sys.executable, "-m", "pali_jax.serve", "--model", str(DEMO_MODEL), "--name", NAME, "--port", str(port),
         "--slots", "2", "--decode-steps", "1", "--max-prompt-tokens", "16", "--max-tokens", "64",
         "--shutdown-timeout", "60"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        path = min(image_root.glob("*.png"))
        streams = [long_answer(client, path, stream=True) for _ in range(3)]  # two decoding, one waiting
        firsts = [next(s) for s in streams]
        assert all(f.choices[0].delta.role == "assistant" for f in firsts)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
            long_answer(client, path)  # refused: the socket is closed (or 503 on a kept connection)
        finishes = [[c.choices[0].finish_reason for c in s if c.choices][-1] for s in streams]
        assert finishes == ["length"] * 3
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
