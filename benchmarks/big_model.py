"""A big PaliGemma 2 at full depth on this machine's CPU, quantised as it loads: does it fit?

    python -m benchmarks.big_model --work /tmp/pg2-big --keep                # 10B, int8, 27 + 42 layers
    python -m benchmarks.big_model --work /tmp/pg2-big --keep --scheme int8 int4
    python -m benchmarks.big_model --preset paligemma2-28b-224 --scheme int4 --work /tmp/pg2-big
    python -m benchmarks.big_model --work /tmp/pg2-smoke --vision-layers 1 --text-layers 1 --no-report

Writes (once; a complete one in --work is reused) a transformers-format checkpoint of random
bfloat16 weights: config.json from `hf_reference.hf_config`, the demo model's tokenizer (ids it
does not know decode to nothing; the timings do not depend on the text), and
`model.safetensors.index.json` with shards of about 2 GB named and laid out as transformers'
`save_pretrained` writes them (its own functions name the tensors of a model built on the meta
device: no weight is allocated). The shards are written by hand, tensor by tensor and a chunk of
16M values at a time, so this process never holds more than a chunk. The values are random bf16
bit patterns (random sign and mantissa, magnitude 2**-9..2**-5, std about 0.014: ten times faster
than drawing normals and rounding them), the SigLIP LayerNorm weights one and biases zero;
Gemma's RMSNorm weights are small like the rest (it scales by 1 + w).

Then, per --scheme, a fresh process does what a user does: `PaliGemma.from_pretrained(dir,
dtype="bfloat16", quantize=scheme)`, then `generate(image, "caption en", max_new_tokens=N)`
greedily: the load time, the first call (compilation included), then warm: time to first token
and N tokens (decode ms/token = (N tokens - TTFT) / (N - 1)), the tokens it produced and why it
stopped, the bytes of the parameters as held, and its peak RSS (VmHWM) after loading and at the end.

bf16 is never attempted: its weights' bytes are computed and reported against MemTotal. A scheme
whose weights as held (int4: two values per byte where the CPU kernels run, else one;
docs/quantization.md) would not leave WORKING_BYTES of this machine's available memory, or a
checkpoint that would not fit the free disk, is refused with one line instead of tried.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import child as child_process
from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pali_jax" / "assets" / "demo"
IMAGE = DEMO / "images" / "shapes_0.png"
PROMPT = "caption en"
SHARD_BYTES = 2 * 10**9
CHUNK = 1 << 24  # values generated and written at once
WORKING_BYTES = 2 * 10**9  # what a run needs beyond its weights: XLA, the caches, the interpreter
DISK_MARGIN = 10**9
GB = 1e9


# -- the checkpoint --------------------------------------------------------------------------------
def hf_model_config(preset_name: str, vision_layers: int | None, text_layers: int | None):
    """The transformers config of a preset at the given depths (None: the preset's own), in bfloat16."""
    import torch

    from benchmarks.hf_reference import hf_config
    from pali_jax.config import preset

    cfg = hf_config(preset(preset_name), vision_layers, text_layers)
    cfg.dtype = torch.bfloat16
    cfg.architectures = ["PaliGemmaForConditionalGeneration"]
    return cfg


def tensor_shapes(hf_cfg) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors `save_pretrained` writes for this config, in its order: the
    model's state dict (built on the meta device), less the tied lm_head, under the checkpoint names."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(hf_cfg)
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    return {name: tuple(t.shape) for name, t in state.items()}


def shard_plan(shapes: dict[str, tuple[int, ...]], max_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Tensor names per shard, in order: a new shard when the next tensor would pass max_bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def safetensors_header(shapes: dict[str, tuple[int, ...]], names: list[str]) -> bytes:
    """A bf16 safetensors file's first bytes: the 8-byte little-endian header length, then the
    JSON header (padded with spaces to a multiple of 8, as the safetensors library writes it)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        n = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _init(name: str) -> str:
    """How a tensor is filled: "ones" (SigLIP's LayerNorm weights), "zeros" (biases) or "random"."""
    if name.startswith("vision_tower") and ("layer_norm" in name or "layernorm" in name) and name.endswith(".weight"):
        return "ones"
    return "zeros" if name.endswith(".bias") else "random"


def random_bf16(rng, n: int):
    """n random bfloat16 bit patterns as uint16: random sign and 7-bit mantissa, exponent 2**-9..2**-6."""
    import numpy as np

    r = rng.integers(0, 2**64 - 1, -(-n // 4), dtype=np.uint64, endpoint=True).view(np.uint16)[:n]
    exponent = ((r >> np.uint16(7)) & np.uint16(3)) + np.uint16(127 - 9)
    return (r & np.uint16(0x807F)) | (exponent << np.uint16(7))


def write_tensor(f, name: str, shape: tuple[int, ...], rng) -> None:
    """One tensor's bf16 bytes, CHUNK values at a time."""
    import numpy as np

    n, kind = math.prod(shape), _init(name)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        if kind == "random":
            chunk = random_bf16(rng, m)
        else:
            chunk = np.full(m, 0x3F80 if kind == "ones" else 0, np.uint16)  # bf16 1.0 / 0.0
        f.write(memoryview(chunk.astype("<u2", copy=False)))


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def checkpoint_complete(hf_dir: Path, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether hf_dir holds this checkpoint whole (the index is written last, after every shard)."""
    index = hf_dir / "model.safetensors.index.json"
    if not index.exists() or not (hf_dir / "config.json").exists() or not (hf_dir / "tokenizer.model").exists():
        return False
    plan = shard_plan(shapes)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError):
        return False
    if weight_map != {name: shard_name(k + 1, len(plan)) for k, names in enumerate(plan) for name in names}:
        return False
    for k, names in enumerate(plan):
        size = len(safetensors_header(shapes, names)) + sum(2 * math.prod(shapes[n]) for n in names)
        path = hf_dir / shard_name(k + 1, len(plan))
        if not path.exists() or path.stat().st_size != size:
            return False
    return True


def write_checkpoint(hf_cfg, hf_dir: Path, seed: int = 0) -> dict:
    """A random bf16 transformers checkpoint of `hf_cfg` in hf_dir, unless one is there whole.
    {"written": bool, "seconds", "bytes", "shards"}."""
    import numpy as np

    from pali_jax.files import atomic_write, write_text_atomically

    shapes = tensor_shapes(hf_cfg)
    plan = shard_plan(shapes)
    total = sum(2 * math.prod(s) for s in shapes.values())
    if checkpoint_complete(hf_dir, shapes):
        return {"written": False, "seconds": 0.0, "bytes": total, "shards": len(plan)}
    t0 = time.perf_counter()
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    hf_cfg.save_pretrained(hf_dir)
    shutil.copy2(DEMO / "model" / "tokenizer.model", hf_dir / "tokenizer.model")
    ordinal = {name: i for i, name in enumerate(shapes)}
    for k, names in enumerate(plan):
        with atomic_write(hf_dir / shard_name(k + 1, len(plan))) as f:
            f.write(safetensors_header(shapes, names))
            for name in names:  # a generator per tensor: the same values whichever shard it lands in
                write_tensor(f, name, shapes[name], np.random.default_rng([seed, ordinal[name]]))
    index = {"metadata": {"total_size": total},
             "weight_map": {name: shard_name(k + 1, len(plan)) for k, names in enumerate(plan) for name in names}}
    write_text_atomically(hf_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return {"written": True, "seconds": time.perf_counter() - t0, "bytes": total, "shards": len(plan)}


# -- what fits -------------------------------------------------------------------------------------
def meminfo() -> dict[str, int]:
    """/proc/meminfo's fields in bytes."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def held_bytes(cfg, scheme: str | None) -> int:
    """Bytes of the parameters as pali-jax holds them on this CPU in bfloat16 (its inference layout:
    int4 nibble-packed where the kernels run, else one value per byte), from the model's abstract
    tree."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pali_jax.backend import Policy
    from pali_jax.paligemma import abstract_params
    from pali_jax.quantize import Quantization

    layout = dataclasses.replace(Policy.host().inference_layout(jnp.bfloat16), quant=Quantization(scheme) if scheme else None)
    tree = abstract_params(cfg, jnp.bfloat16, layout=layout)
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def int4_form() -> str:
    """How this CPU holds int4 values in bfloat16, in words."""
    import jax.numpy as jnp

    from pali_jax.backend import Policy

    return "two values per byte" if Policy.host().inference_layout(jnp.bfloat16).int4_packed else "one value per byte on this CPU"


def _existing(path: Path) -> Path:
    """path, or its nearest existing parent (whose disk it would be on)."""
    while not path.exists():
        path = path.parent
    return path


def refusal(name: str, scheme: str, held: int, checkpoint: int, complete: bool, work: Path) -> str | None:
    """Why a scheme cannot run here (one line), or None."""
    mem = meminfo()
    if held + WORKING_BYTES > mem["MemAvailable"]:
        form = f" (int4 held {int4_form()})" if scheme == "int4" else ""
        return (f"{name} in {scheme} needs {held / GB:.1f} GB of weights held{form} + {WORKING_BYTES / GB:.0f} GB to run, "
                f"more than the {mem['MemAvailable'] / GB:.1f} GB available (MemTotal {mem['MemTotal'] / GB:.1f} GB): not run")
    free = shutil.disk_usage(_existing(work)).free
    if not complete and checkpoint + DISK_MARGIN > free:
        return (f"{name}'s bf16 checkpoint needs {checkpoint / GB:.1f} GB of disk, more than the "
                f"{free / GB:.1f} GB free in {work} (less {DISK_MARGIN / GB:.0f} GB): not run")
    return None


# -- one scheme, in its own process ----------------------------------------------------------------
def child(spec: dict) -> dict:
    """from_pretrained quantised, then generate as a user does; timings, bytes and peak RSS."""
    import jax

    from benchmarks.peak_rss import peak_rss_bytes, rss_bytes
    from pali_jax import PaliGemma

    t0 = time.perf_counter()
    pg = PaliGemma.from_pretrained(spec["hf_dir"], dtype="bfloat16", quantize=spec["scheme"])
    load_s = time.perf_counter() - t0
    load_peak, load_rss = peak_rss_bytes(), rss_bytes()
    held = sum(x.addressable_shards[0].data.on_device_size_in_bytes() for x in jax.tree.leaves(pg.params))
    n = spec["new_tokens"]

    def gen(tokens: int):
        return pg.generate(spec["image"], PROMPT, max_new_tokens=tokens)[0]

    t0 = time.perf_counter()
    first = gen(n)
    first_s = time.perf_counter() - t0
    ttft, full = [], []
    for _ in range(spec["runs"]):
        t0 = time.perf_counter()
        gen(1)
        ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = gen(n)
        full.append(time.perf_counter() - t0)
    ttft_s, full_s = statistics.median(ttft), statistics.median(full)
    return {
        "load_s": load_s, "load_peak_rss_bytes": load_peak, "load_rss_bytes": load_rss, "held_bytes": held,
        "first_call_s": first_s, "ttft_s": ttft_s, "full_s": full_s,
        "decode_ms_per_token": (full_s - ttft_s) / max(n - 1, 1) * 1e3,
        "tokens": len(result.token_ids), "stop_reason": result.stop_reason,
        "same_tokens": result.token_ids == first.token_ids, "peak_rss_bytes": peak_rss_bytes(),
    }


# -- the run ---------------------------------------------------------------------------------------
def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def main() -> None:
    if child_process.serve(child):
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paligemma2-10b-224", help="a pali_jax.config preset (default %(default)s)")
    p.add_argument("--scheme", nargs="+", choices=("int8", "int4"), default=["int8"],
                   help="quantisations to run, each in its own process (bf16 is only computed)")
    p.add_argument("--work", type=Path, help="where the checkpoint is written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (a rerun reuses it); else it is removed")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=1, help="warm repeats of TTFT and of the N-token call (medians)")
    p.add_argument("--vision-layers", type=int, help="fewer SigLIP layers (a smoke run); default the preset's")
    p.add_argument("--text-layers", type=int, help="fewer decoder layers (a smoke run); default the preset's")
    p.add_argument("--seed", type=int, default=0)
    report.add_arguments(p)
    args = p.parse_args()

    from pali_jax.config import PaliGemmaConfig, preset

    hf_cfg = hf_model_config(args.preset, args.vision_layers, args.text_layers)
    cfg = PaliGemmaConfig.from_hf(hf_cfg.to_dict())
    full = preset(args.preset)
    depth = f"{cfg.vision.depth} + {cfg.text.depth} layers"
    full_depth = (cfg.vision.depth, cfg.text.depth) == (full.vision.depth, full.text.depth)
    name = f"{args.preset} ({depth}{'' if full_depth else ', reduced'})"
    work = args.work or Path(tempfile.mkdtemp(prefix="pali-jax-big-"))
    hf_dir = work / f"{args.preset}-{cfg.vision.depth}+{cfg.text.depth}"
    shapes = tensor_shapes(hf_cfg)
    checkpoint = sum(2 * math.prod(s) for s in shapes.values())
    complete = checkpoint_complete(hf_dir, shapes)
    mem = meminfo()
    bf16 = held_bytes(cfg, None)
    held = {s: held_bytes(cfg, s) for s in args.scheme}
    print(f"{name}: {checkpoint / 2 / 1e9:.2f} B parameters; bf16 weights {gb(bf16)} GB "
          f"({bf16 / mem['MemTotal']:.0%} of MemTotal {gb(mem['MemTotal'])} GB, not attempted); "
          + "; ".join(f"{s} held {gb(b)} GB" for s, b in held.items()), flush=True)
    refused = {s: refusal(args.preset, s, held[s], checkpoint, complete, work) for s in args.scheme}
    for line in filter(None, refused.values()):
        print(line, file=sys.stderr)
    schemes = [s for s in args.scheme if refused[s] is None]
    if not schemes:
        sys.exit(2)

    work.mkdir(parents=True, exist_ok=True)
    disk_free = shutil.disk_usage(work).free
    written = write_checkpoint(hf_cfg, hf_dir, args.seed)
    print(f"checkpoint {hf_dir}: {gb(written['bytes'])} GB in {written['shards']} shards, "
          + (f"written in {written['seconds']:.0f} s" if written["written"] else "reused"), flush=True)
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pali-jax-big-run-") as tmp:
            for scheme in schemes:
                spec = {"hf_dir": str(hf_dir), "scheme": scheme, "new_tokens": args.new_tokens, "runs": args.runs,
                        "image": str(IMAGE)}
                results[scheme] = r = child_process.run("benchmarks.big_model", spec, Path(tmp))
                print(f"{scheme}: load {r['load_s']:.1f} s (peak RSS {gb(r['load_peak_rss_bytes'])} GB), held "
                      f"{gb(r['held_bytes'])} GB; first call {r['first_call_s']:.1f} s; TTFT {r['ttft_s']:.2f} s; "
                      f"decode {r['decode_ms_per_token']:.0f} ms/token; {r['tokens']} tokens in {r['full_s']:.1f} s "
                      f"({r['stop_reason']}); peak RSS {gb(r['peak_rss_bytes'])} GB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(hf_dir, ignore_errors=True)

    rows = [
        ["checkpoint on disk (bf16 safetensors), GB", *[gb(written["bytes"])] * len(schemes)],
        ["bf16 weights alone (not attempted), GB", *[f"{gb(bf16)} = {bf16 / mem['MemTotal']:.0%} of MemTotal"] * len(schemes)],
        ["weights as held, GB", *[gb(results[s]["held_bytes"]) for s in schemes]],
        ["from_pretrained (quantised as read), s", *[f"{results[s]['load_s']:.0f}" for s in schemes]],
        ["peak RSS after loading, GB", *[gb(results[s]["load_peak_rss_bytes"]) for s in schemes]],
        [f"first generate call ({args.new_tokens} tokens, compilation included), s",
         *[f"{results[s]['first_call_s']:.0f}" for s in schemes]],
        ["time to first token (warm), s", *[f"{results[s]['ttft_s']:.1f}" for s in schemes]],
        ["decode, ms/token", *[f"{results[s]['decode_ms_per_token']:.0f}" for s in schemes]],
        [f"{args.new_tokens} tokens (warm), s", *[f"{results[s]['full_s']:.1f}" for s in schemes]],
        ["tokens generated (stop reason)", *[f"{results[s]['tokens']} ({results[s]['stop_reason']})" for s in schemes]],
        ["peak RSS, GB", *[gb(results[s]["peak_rss_bytes"]) for s in schemes]],
    ]
    for row in rows:
        print(" | ".join(row))
    big = preset("paligemma2-28b-224")
    computed = [f"{s} would hold {gb(held_bytes(cfg, s))} GB" for s in ("int8", "int4") if s not in schemes]
    computed.append(f"PaliGemma 2 28B would hold {gb(held_bytes(big, 'int4'))} GB in int4 ({int4_form()}), "
                    f"{gb(held_bytes(big, 'int8'))} GB in int8, {gb(held_bytes(big, None))} GB in bf16")
    note = (f"Random weights, batch 1, greedy, {PROMPT!r} on {IMAGE.name}; GB = 10^9 bytes. This machine: MemTotal "
            f"{gb(mem['MemTotal'])} GB, {gb(mem['MemAvailable'])} GB available at the start; {gb(disk_free)} GB free "
            f"on the checkpoint's disk. " + "; ".join(computed) + ".")
    report.write(args, "big_model", [f"{name}, batch 1", *schemes], rows, note=note)


if __name__ == "__main__":
    main()
