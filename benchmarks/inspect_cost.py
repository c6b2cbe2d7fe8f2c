"""What recording attentions costs in generation, and proof that not recording costs nothing.

    python -m benchmarks.inspect_cost                 # demo model + PaliGemma 1 3B widths (2 + 2 layers)
    python -m benchmarks.inspect_cost --skip-wide     # the demo model only (seconds)

* Program identity: the SHA-256 of the flags-off generate program's StableHLO (source locations
  stripped), for the demo model in float32 and bfloat16. Run it on two commits: equal hashes mean
  the same program.
* Time, side by side in one process (medians of interleaved runs, compile excluded): `generate_ids`
  with output_attentions / output_scores off, on, and off again.
* Memory of output_attentions from shapes (`generate.decode_bytes`, nothing allocated), for
  PaliGemma 1 3B at full depth (18 layers, 8 heads) and a "caption en" prompt: the prefill's
  [L, N, T, S] and one [L, N, S] per new token, float32, per row.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import time

import numpy as np

from benchmarks import report
from pali_jax.config import preset
from pali_jax.generate import MIN_NEW_TOKENS_BUCKET, MIN_TEXT_BUCKET, bucket, decode_bytes, prepare_prompts
from pali_jax.generation_config import GenerationConfig
from pali_jax.pretrained import PaliGemma

DEMO_MODEL = "pali_jax/assets/demo/model"


def program_hash(pg: PaliGemma, generation: GenerationConfig) -> str:
    """SHA-256 (16 hex digits) of the lowered generate program, source locations removed."""
    cfg = pg.config
    enc = pg.tokenizer(["caption en"], num_image_tokens=cfg.num_image_tokens)
    statics, ids, types, mask, stops = prepare_prompts(cfg, enc.input_ids, enc.token_type_ids, enc.attention_mask,
                                                       generation)
    pixels = np.zeros((1, cfg.image_size, cfg.image_size, 3), pg.dtype)
    lowered = pg.generator._generate.lower(statics, pg.params, pixels, ids, types, mask,
                                           np.int32(generation.max_new_tokens), generation.sampling_params(),
                                           generation.prng_key(), stops)
    text = re.sub(r"loc\(.*?\)|#loc\d*", "", lowered.as_text())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def side_by_side(pg: PaliGemma, batch: int, new_tokens: int, runs: int) -> dict[str, float]:
    """Median seconds of generate_ids with the records off, on, and off again, runs interleaved."""
    rng = np.random.default_rng(0)
    cfg = pg.config
    pixels = rng.uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    enc = pg.tokenizer(["caption en"] * batch, num_image_tokens=cfg.num_image_tokens)
    calls = {
        "off": dict(), "on": dict(output_attentions=True, output_scores=True), "off again": dict(),
    }
    run = lambda kw: pg.generate_ids(pixels, enc.input_ids, enc.token_type_ids, enc.attention_mask,  # noqa: E731
                                     max_new_tokens=new_tokens, **kw)
    for kw in calls.values():
        run(kw)  # compile
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, kw in calls.items():
            t0 = time.perf_counter()
            run(kw)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def attention_bytes(rows: int, new_tokens: int = 32) -> int:
    """Bytes output_attentions adds for PaliGemma 1 3B, full depth, a "caption en" prompt."""
    cfg = preset("paligemma-3b-224")
    prompt = cfg.num_image_tokens + bucket(4, MIN_TEXT_BUCKET)  # <bos> caption en "\n": the 16-token bucket
    buffer = bucket(new_tokens, MIN_NEW_TOKENS_BUCKET)
    args = (cfg, rows, prompt + buffer, buffer, np.float32, False)
    return decode_bytes(*args, attentions_of_prompt=prompt) - decode_bytes(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--skip-wide", action="store_true", help="skip PaliGemma 1 3B widths (2 + 2 layers)")
    report.add_arguments(parser)
    args = parser.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        pg = PaliGemma.from_pretrained(DEMO_MODEL, dtype=dtype)
        digest = program_hash(pg, GenerationConfig(max_new_tokens=16))
        print(f"demo {dtype}: flags-off generate program {digest}")
        rows.append((f"demo model, {dtype}: StableHLO hash of the flags-off generate program", f"`{digest}`"))
    models = [("demo model, float32, batch 8, 16 tokens", PaliGemma.from_pretrained(DEMO_MODEL), 8, 16)]
    if not args.skip_wide:
        from benchmarks.annotate import wide_model

        models.append(("PaliGemma 1 3B widths, 2 + 2 layers, float32, batch 1, 16 tokens", wide_model(), 1, 16))
    for name, pg, batch, new_tokens in models:
        t = side_by_side(pg, batch, new_tokens, args.runs)
        print(f"{name}: off {t['off'] * 1e3:.1f} ms, on {t['on'] * 1e3:.1f} ms ({t['on'] / t['off']:.2f}x), "
              f"off again {t['off again'] * 1e3:.1f} ms ({t['off again'] / t['off']:.2f}x)")
        rows.append((f"{name}: generate_ids ms, recording off / on / off again",
                     f"{t['off'] * 1e3:.1f} / {t['on'] * 1e3:.1f} / {t['off again'] * 1e3:.1f}"))
    for rows_ in (1, 8):
        megabytes = attention_bytes(rows_) / 1e6
        print(f"output_attentions, PaliGemma 1 3B (18 layers x 8 heads), 'caption en', 32 new tokens, {rows_} row(s): "
              f"{megabytes:.1f} MB")
        rows.append((f"output_attentions memory, PaliGemma 1 3B, 'caption en', 32 new tokens, {rows_} row(s), MB",
                     round(megabytes, 1)))
    report.write(args, "inspect_cost", ["what", "measured"], rows,
                 note=f"Times are medians of {args.runs} interleaved runs, compile excluded; memory is from shapes.")


if __name__ == "__main__":
    main()
