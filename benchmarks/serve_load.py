"""`pali-jax serve` under load: concurrent HTTP clients on localhost against the dataset job on the same images.

    python -m benchmarks.serve_load demo --requests 1000 --clients 32 --hostile 200
    python -m benchmarks.serve_load wide --requests 64 --clients 16 --slots 8

The server (`pali_jax.serve.make_server`, served by uvicorn on a thread of this process) answers
`--requests` chat completions sent by `--clients` concurrent clients in a child process (keep-alive
connections, bodies built before the clock starts), bounded by --time-limit. Reported: throughput,
p50 / p99 latency, errors, the dataset job's (`pali_jax.annotate`, the same slots) images/s on the
same images in this process, and their ratio.

demo: the bundled model, shapes images with mixed prompts (captions, colour questions,
detections); every answer is checked against `pg.generate` on its image alone (text and boxes).
`--hostile N` mixes N malformed requests in (each must be a 4xx with OpenAI's error JSON) and the
server's resident memory is read after the first 100 valid answers and at the end.
wide: PaliGemma 1 3B widths at 2 + 2 layers with random weights (`benchmarks.annotate.wide_model`),
"caption en" with max_tokens 8 or 64 in random order; answers are checked against the job's (its
own are `generate`'s, tests/test_annotate.py).

Programs are compiled before the clock starts (the server's warm-up, the job's warm-up run).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image

from benchmarks import report
from benchmarks.peak_rss import rss_bytes
from benchmarks.annotate import demo_items, wide_items, wide_model
from pali_jax.annotate import Item, JobStats, annotate

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"
NAME = "bench"


# -- the clients (a child process: they must not share this process's GIL with the server) -------
def clients_main(spec_path: str) -> None:
    """Reads {url, clients, time_limit, requests: [{body, check}]} and prints one JSON line per
    finished request: [index, status, latency_s, body or error]."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    spec = json.loads(Path(spec_path).read_text())
    todo: queue.Queue = queue.Queue()
    for i, request in enumerate(spec["requests"]):
        todo.put((i, request.encode()))
    deadline = time.monotonic() + spec["time_limit"]
    out, lock = [], threading.Lock()

    def client(_):
        with httpx.Client(base_url=spec["url"], timeout=spec["time_limit"]) as http:
            while time.monotonic() < deadline:
                try:
                    i, body = todo.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                    result = [i, r.status_code, time.perf_counter() - t0, r.text]
                except httpx.HTTPError as e:
                    result = [i, 0, time.perf_counter() - t0, f"{type(e).__name__}: {e}"]
                with lock:
                    out.append(result)

    t0, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(spec["clients"]) as pool:
        list(pool.map(client, range(spec["clients"])))
    print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "results": out}))


# -- the server side -------------------------------------------------------------------------------
def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def body(url: str, prompt: str, max_tokens: int) -> str:
    return json.dumps({"model": NAME, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}]})


def hostile_bodies(url: str, n: int) -> list[str]:
    """n malformed requests, the kinds in turn (tests/test_serve.py has the full list)."""
    ok = json.loads(body(url, "caption en", 8))
    kinds = ["{\"model\": ", "[1, 2]", json.dumps({**ok, "model": 3}), json.dumps({**ok, "n": 2}),
             json.dumps({**ok, "messages": [{"role": "wizard", "content": "x"}]}),
             json.dumps({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"}, {
                 "type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}),
             json.dumps({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"}, {
                 "type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                    + base64.b64encode(b"not an image").decode()}}]}]}),
             json.dumps({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"}, {
                 "type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
             json.dumps({**ok, "max_tokens": "8"}), json.dumps({**ok, "temperature": -1}),
             json.dumps({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": "answer en "
                         + "what is red " * 60}, ok["messages"][0]["content"][0]]}]})]
    return [kinds[i % len(kinds)] for i in range(n)]


def serve(pg, args, max_prompt_tokens: int, max_tokens: int):
    """The server on a free port, ready (compiled); (running uvicorn server, thread, url, engine)."""
    import socket

    import httpx
    import uvicorn

    from pali_jax.openai_api import Limits
    from pali_jax.serve import Options, make_server

    # The load is bounded by --time-limit, not per request: a request's queue wait counts toward the
    # server's timeout, which at PaliGemma widths exceeds the 60 s default.
    options = Options(NAME, Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens),
                      request_timeout_s=args.request_timeout)
    server = make_server(pg, options, slots=args.slots, queue_size=max(args.clients * 2, 64), steps=args.decode_steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                            lifespan="on")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.engine.failed:
            raise RuntimeError(server.engine.failed)
        time.sleep(0.1)
    return running, thread, url, server.engine, time.perf_counter() - t0


def load(url: str, bodies: list[str], args, engine) -> dict:
    """Runs the clients; samples this process's RSS after 100 valid answers and at the end."""
    rss = {}
    done = threading.Event()
    counted = ("pali_jax_refills_total", "pali_jax_decode_calls_total")
    before = [engine.metrics.registry.get_sample_value(name) or 0 for name in counted]

    def sample():
        registry = engine.metrics.registry
        while not done.is_set():
            answered = registry.get_sample_value("pali_jax_requests_total", {"status": "200"}) or 0
            if answered >= 100 and "after_100" not in rss:
                rss["after_100"] = rss_bytes() / 2**20
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"url": url, "clients": args.clients, "time_limit": args.time_limit, "requests": bodies}, f)
    cpu0 = time.process_time()
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--clients-of", f.name],
                             capture_output=True, text=True, cwd=ROOT, check=True)
    finally:
        Path(f.name).unlink()
        done.set()
    rss["at_end"] = rss_bytes() / 2**20
    server_cpu_s = time.process_time() - cpu0
    result = json.loads(out.stdout)
    result["server_cpu_s"] = server_cpu_s
    result["server_refills"], result["server_decode_calls"] = (
        (engine.metrics.registry.get_sample_value(name) or 0) - b for name, b in zip(counted, before))
    result["rss_mb"] = rss
    return result


def job_run(pg, items: list[Item], slots: int, default_tokens: int) -> tuple[dict, list[list[int]]]:
    """(the dataset job's figures on `items`, its token ids per item)."""
    # The whole set once first: the timed job meets no refill size it has not compiled, as the
    # server, warmed up on every size, meets none.
    list(annotate(pg, items, slots=slots, max_new_tokens=default_tokens))
    stats = JobStats()
    t0, cpu0 = time.perf_counter(), time.process_time()
    records = list(annotate(pg, items, slots=slots, max_new_tokens=default_tokens, stats=stats))
    figures = {"job_images_per_s": len(items) / (time.perf_counter() - t0), "job_cpu_s": time.process_time() - cpu0,
               "job_refills": stats.decoder.refills, "job_decode_calls": stats.decoder.decode_calls}
    return figures, [r["token_ids"] for r in records]


def serve_and_load(pg, args, max_prompt_tokens: int, max_tokens: int, bodies: list[str]) -> tuple[dict, float]:
    """(the clients' results against a server started for this load, the server's start-up seconds)."""
    running, thread, url, engine, startup_s = serve(pg, args, max_prompt_tokens, max_tokens)
    try:
        return load(url, bodies, args, engine), startup_s
    finally:
        running.should_exit = True
        thread.join(60)


def with_job(out: dict, args, job: dict, startup_s: float) -> dict:
    """`summarise`'s figures with the job's beside them and their ratio."""
    return {**out, "slots": args.slots, "clients": args.clients, "server_startup_s": round(startup_s, 1),
            **{k: round(v, 3) for k, v in job.items()},
            "ratio_to_job": round(out["requests_per_s"] / job["job_images_per_s"], 3)}


def summarise(result: dict, n_valid: int, check) -> dict:
    valid = [r for r in result["results"] if r[0] < n_valid]
    hostile = [r for r in result["results"] if r[0] >= n_valid]
    ok = [r for r in valid if r[1] == 200]
    latencies = np.array([r[2] for r in ok]) if ok else np.zeros(1)
    wrong = sum(not check(r[0], json.loads(r[3])) for r in ok)
    hostile_ok = sum(400 <= r[1] < 500 and isinstance(json.loads(r[3]).get("error", {}).get("message"), str)
                     for r in hostile)
    out = {
        "requests": n_valid, "answered": len(ok), "errors": len(valid) - len(ok), "wrong_answers": wrong,
        "requests_per_s": round(len(ok) / result["wall_s"], 2), "wall_s": round(result["wall_s"], 2),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 4),
        "server_cpu_s": round(result["server_cpu_s"], 2), "clients_cpu_s": round(result["cpu_s"], 2),
        "server_refills": int(result["server_refills"]), "server_decode_calls": int(result["server_decode_calls"]),
    }
    if hostile:
        out["hostile"] = len(hostile)
        out["hostile_4xx_with_error_json"] = hostile_ok
    rss = result["rss_mb"]
    if "after_100" in rss:
        out["rss_mb_after_100"] = round(rss["after_100"], 1)
        out["rss_mb_at_end"] = round(rss["at_end"], 1)
        out["rss_growth"] = round(rss["at_end"] / rss["after_100"] - 1, 4)
    first = [r[3] for r in valid if r[1] != 200][:3]
    if first:
        out["first_errors"] = [e[:200] for e in first]
    return out


def run_demo(args) -> dict:
    from pali_jax.detection import parse_detections
    from pali_jax.pretrained import PaliGemma

    pg = PaliGemma.from_pretrained(DEMO_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        distinct = demo_items(Path(tmp), min(args.requests, args.distinct))
        items = [distinct[i % len(distinct)] for i in range(args.requests)]
        job, _ = job_run(pg, items, args.slots, 32)
        wants = [pg.generate(i.image, i.prompt, max_new_tokens=32)[0] for i in distinct]
        sizes = [PIL.Image.open(i.image).size for i in distinct]
        urls = [data_url(i.image) for i in distinct]
        longest = max(len(pg.tokenizer.encode_example(i.prompt, num_image_tokens=pg.config.num_image_tokens)[0])
                      for i in distinct) - pg.config.num_image_tokens
        bodies = [body(urls[k % len(distinct)], i.prompt, 32) for k, i in enumerate(items)]
        hostile = hostile_bodies(urls[0], args.hostile)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(bodies) + len(hostile))  # hostile ones spread among the valid ones
        mixed = [(bodies + hostile)[k] for k in order]
        index = {int(k): j for j, k in enumerate(order)}  # original index -> position sent

        def check(position: int, answer: dict) -> bool:
            k = position % len(distinct)
            message = answer["choices"][0]["message"]
            boxes = [{"label": b.label, "box": [b.xmin, b.ymin, b.xmax, b.ymax]}
                     for b in parse_detections(wants[k].text, *sizes[k])]
            return message["content"] == wants[k].text and message["detections"] == boxes

        result, startup_s = serve_and_load(pg, args, max(longest, 16), 32, mixed)
    # back to the original numbering: valid requests first
    back = {j: k for k, j in index.items()}
    result["results"] = [[back[r[0]], *r[1:]] for r in result["results"]]
    return with_job(summarise(result, len(bodies), check), args, job, startup_s)


def run_wide(args) -> dict:
    pg = wide_model()
    with tempfile.TemporaryDirectory() as tmp:
        items = wide_items(args.requests, tmp)
        job, wants = job_run(pg, items, args.slots, 64)
        bodies = [body(data_url(i.image), i.prompt, i.max_new_tokens) for i in items]
        longest = len(pg.tokenizer.encode_example("caption en", num_image_tokens=pg.config.num_image_tokens)[0])
        result, startup_s = serve_and_load(pg, args, max(longest - pg.config.num_image_tokens, 16), 64, bodies)

    def check(k: int, answer: dict) -> bool:
        return answer["choices"][0]["message"]["content"] == pg.tokenizer.decode(wants[k])

    return with_job(summarise(result, len(bodies), check), args, job, startup_s)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--clients-of"]:
        clients_main(argv[1])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=("demo", "wide"))
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=600.0, help="the server's per-request timeout, s")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--hostile", type=int, default=0, help="demo: malformed requests mixed in")
    p.add_argument("--distinct", type=int, default=200, help="demo: distinct images (requests cycle over them)")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds the clients run at most")
    report.add_arguments(p)
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 100_000):
        p.error("--clients must be in [1, 256] and --requests in [1, 100000]")
    result = run_demo(args) if args.which == "demo" else run_wide(args)
    print(json.dumps(result, indent=1))
    report.write(args, f"serve_{args.which}", ["figure", "value"], report.flatten(result),
                 note="requests_per_s: answered requests over the clients' wall time (HTTP, image decoding, the "
                      "clients and the server on the same machine); job_images_per_s: pali_jax.annotate with the "
                      "same slots on the same images; latency from sending to the whole answer.")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
