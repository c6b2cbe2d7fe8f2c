"""Weight-only quantisation (pali_jax.quantize): speed, bytes and quality of bf16 / int8 / int4.

    python -m benchmarks.quantized --work /tmp/pg1-q                          # 2 + 2 layers
    python -m benchmarks.quantized --work /tmp/pg1-q --vision-layers 27 --text-layers 18   # full depth

PaliGemma 1 3B widths (full vocabulary), random weights, built once in --work as a transformers
checkpoint in bfloat16. Each implementation runs in its own process (benchmarks.generation's
child protocol), batch 1, greedy, medians of --runs after a warm-up:

* pali-jax's default API, `PaliGemma.from_pretrained(hf_dir, dtype="bfloat16", quantize=...)` for
  bf16, int8 and int4 (quantised as the checkpoint is read), and transformers' bf16 `generate`:
  TTFT and decode ms/token (decode = (N tokens - 1 token) / (N - 1): pass --new-tokens 64 on
  full-depth models, where a 16-token run's decode is a small difference of two noisy times);
  the decoder's bytes as held in memory (int4: two values per byte where the CPU kernels run,
  else one) and the floor they set (bytes / this machine's read bandwidth, probed in the child
  just before and just after its timings: the rate drifts from minute to minute on a shared host);
* quality against pali-jax's bf16 model on the same checkpoint: the relative L2 error of the
  logits and the top-1 agreement, teacher-forced over 256 random suffix tokens;
* the demo model (pali_jax/assets/demo/model) on 100 fresh scenes (`shapes.scenes(100, seed=777)`,
  every prompt: captions, colour questions, detections): the share of answers equal to the float
  model's;
* the CPU compute form: an int8 weight times a bf16 / f32 row vector, dequantised then multiplied,
  and as `backend.project` multiplies it (the policy's `quantized_form`), against the bf16 / f32
  weight itself.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks import child as child_process
from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pali_jax" / "assets" / "demo" / "model"
SCHEMES = ("bfloat16", "int8", "int4")
SUFFIX = 256


def _logits_file(tmp: Path, scheme: str) -> Path:
    return tmp / f"logits-{scheme}.npy"


def child(spec: dict) -> dict:
    """One implementation: timings, decoder bytes, and (pali-jax) the teacher-forced logits."""
    import jax
    import numpy as np

    from benchmarks.generation import inputs, measure, read_bandwidth, transformers_generator
    from benchmarks.peak_rss import peak_rss_bytes
    from pali_jax import PaliGemma

    if spec["impl"] == "transformers":
        cfg, gen = transformers_generator(spec["hf_dir"], "bfloat16")
        row = measure(gen, cfg, 1, spec["prompt_tokens"], spec["new_tokens"], spec["runs"])
        return {"row": row, "peak_rss_bytes": peak_rss_bytes()}
    scheme = spec["scheme"]
    pg = PaliGemma.from_pretrained(spec["hf_dir"], dtype="bfloat16", quantize=None if scheme == "bfloat16" else scheme)
    gen = lambda pixels, ids, n: pg.generate_ids(pixels, ids, max_new_tokens=n).tokens  # noqa: E731
    # The machine's read rate moves from minute to minute (a shared host): probed just before and
    # just after this scheme's timings, so that its floor is the one it ran against.
    before = read_bandwidth()
    row = measure(gen, pg.config, 1, spec["prompt_tokens"], spec["new_tokens"], spec["runs"])
    bandwidth = [before, read_bandwidth()]
    held = sum(x.addressable_shards[0].data.on_device_size_in_bytes() for x in jax.tree.leaves(pg.params["llm"]))
    pixels, ids = inputs(pg.config, 1, spec["prompt_tokens"])
    suffix = np.random.default_rng(1).integers(3, 256000, (1, SUFFIX)).astype(np.int32)
    ids = np.concatenate([ids, suffix], axis=1)
    types = np.concatenate([np.zeros((1, ids.shape[1] - SUFFIX)), np.ones((1, SUFFIX))], axis=1).astype(np.int32)
    logits = np.asarray(pg.forward(pixels, ids, types))[0, -SUFFIX - 1 : -1].astype(np.float32)
    np.save(spec["logits"], logits)
    return {"row": row, "decoder_bytes": held, "bandwidth": bandwidth, "peak_rss_bytes": peak_rss_bytes()}


def demo_agreement(n_scenes: int = 100) -> dict[str, float]:
    """Share of the demo model's answers on fresh scenes equal to the float model's, per scheme."""
    from pali_jax import PaliGemma
    from pali_jax.demo import shapes

    scenes = shapes.scenes(n_scenes, seed=777)
    images = [shapes.render(s) for s in scenes for _ in shapes.prompts(s)]
    prompts = [p for s in scenes for p, _ in shapes.prompts(s)]
    answers = {}
    for scheme in (None, "int8", "int4"):
        pg = PaliGemma.from_pretrained(DEMO, quantize=scheme)
        answers[scheme] = [r.text for r in pg.generate(images, prompts, max_new_tokens=16, batch_size=64)]
    return {s: sum(a == b for a, b in zip(answers[s], answers[None])) / len(prompts) for s in ("int8", "int4")} | {
        "answers": len(prompts)}


def compute_forms(runs: int = 20, k: int = 2048, n: int = 16384) -> list[list]:
    """XLA:CPU on an int8 weight [n, k] (output-first) times one row: the float weight, the whole
    weight dequantised then multiplied, and `backend.project` in the form the policy picks."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pali_jax import backend, quantize
    from pali_jax.quantize import Quantization

    w32 = np.random.default_rng(0).normal(size=(n, k)).astype(np.float32)
    q = jax.device_put(quantize.quantize(w32, Quantization("int8"), (1,)))
    policy = backend.Policy.host()
    options = policy.compiler_options()
    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jnp.ones((1, k), dtype)
        w = jnp.asarray(w32, dtype)
        plain = jax.jit(lambda x, w: backend.project(x, w, 1, True, policy), compiler_options=options)
        deq = jax.jit(lambda x, q: backend.project(x, quantize.dequantize(q, x.dtype), 1, True, policy),
                      compiler_options=options)
        chosen = jax.jit(lambda x, q: backend.project(x, q, 1, True, policy), compiler_options=options)
        timings = {}
        for name, fn, args in (("weight", plain, (x, w)), ("dequantize", deq, (x, q)), ("policy", chosen, (x, q))):
            fn(*args).block_until_ready()
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(*args).block_until_ready()
                ts.append(time.perf_counter() - t0)
            timings[name] = statistics.median(ts) * 1e3
        rows.append([jnp.dtype(dtype).name, f"{timings['weight']:.2f}", f"{timings['dequantize']:.2f}",
                     f"{timings['policy']:.2f} ({policy.quantized_form(dtype, 1, True, q[quantize.QVALUE].dtype)})"])
    return rows


def main() -> None:
    if child_process.serve(child):
        return
    from benchmarks.hf_reference import add_checkpoint_arguments, pg1_checkpoint  # torch: not in the children

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_arguments(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-demo", action="store_true")
    report.add_arguments(p)
    args = p.parse_args()

    import numpy as np

    from pali_jax.backend import cpu_features

    hf_dir = pg1_checkpoint(args, "pali-jax-quantized-")
    tmp = Path(tempfile.mkdtemp(prefix="pali-jax-quantized-run-"))
    common = {"hf_dir": str(hf_dir), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs}
    results = {s: child_process.run("benchmarks.quantized", {**common, "impl": "pali_jax", "scheme": s, "logits": str(_logits_file(tmp, s))}, tmp)
               for s in SCHEMES}
    if not args.skip_transformers:
        results["transformers"] = child_process.run("benchmarks.quantized", {**common, "impl": "transformers"}, tmp)
    ref = np.load(_logits_file(tmp, "bfloat16"), allow_pickle=False)
    rows = []
    bf16_ms = results["bfloat16"]["row"]["decode_ms_per_token"]
    for name, res in results.items():
        row = res["row"]
        ms = row["decode_ms_per_token"]
        quality = ["", ""]
        floor = over_floor = ""
        if name in SCHEMES:
            floor_ms = res["decoder_bytes"] / statistics.mean(res["bandwidth"]) * 1e3
            floor = f"{floor_ms:.1f} ({res['decoder_bytes'] / 1e9:.2f} GB)"
            over_floor = f"{ms / floor_ms:.2f}"
            if name != "bfloat16":
                logits = np.load(_logits_file(tmp, name), allow_pickle=False)
                quality = [f"{np.linalg.norm(logits - ref) / np.linalg.norm(ref):.2e}",
                           f"{np.mean(logits.argmax(-1) == ref.argmax(-1)):.1%}"]
        label = "transformers bf16" if name == "transformers" else f"pali-jax {name}"
        rows.append([label, f"{ms:.1f}", f"{ms / bf16_ms:.2f}", floor, over_floor, f"{row['ttft_s'] * 1e3:.0f}", *quality,
                     f"{res['peak_rss_bytes'] / 2**30:.2f}"])
    for row in rows:
        print(" | ".join(row))
    probes = "; ".join(f"{s} {' / '.join(f'{b / 1e9:.1f}' for b in results[s]['bandwidth'])}" for s in SCHEMES)
    flags = " ".join(sorted(cpu_features())) or "none tracked"
    depth = f"{args.vision_layers} + {args.text_layers} layers"
    report.write(args, "quantized", [
        f"PaliGemma 1 3B widths, {depth}, batch 1", "decode ms/token", "x pali-jax bf16", "read floor ms (decoder bytes held)",
        "x floor", "TTFT ms", f"logits rel. error vs bf16 ({SUFFIX} tokens)", "top-1 agreement", "peak RSS GiB"], rows,
        note=f"CPU flags: {flags}; read bandwidth (`generation.read_bandwidth`) probed before and after each "
             f"scheme's timings, GB/s: {probes}; each floor uses the mean of its scheme's two. Random weights: "
             "agreement is against pali-jax's own bf16 model on the same checkpoint.")
    forms = compute_forms()
    for row in forms:
        print(" | ".join(row))
    report.write(args, "quantized_cpu_form", ["activation dtype", "float weight ms", "int8 dequantise-then-dot ms",
                                              "int8 as backend.project runs it ms (form)"], forms,
                 note=f"[1, 2048] x [16384, 2048] output-first, CPU flags: {flags}. The forms are compared on a "
                      "whole layer by benchmarks/cpu_quant_matmul.py.")
    if not args.skip_demo:
        agree = demo_agreement()
        print(agree)
        report.write(args, "quantized_demo", ["scheme", "answers equal to the float model's"],
                     [[s, f"{agree[s]:.1%} of {agree['answers']}"] for s in ("int8", "int4")],
                     note="the demo model on shapes.scenes(100, seed=777), every prompt, greedy, 16 tokens")


if __name__ == "__main__":
    main()
