"""The multi-device half of tests/test_sharding.py, run in subprocesses with CPU devices.

    python tests/sharding_worker.py WORKDIR             8 devices; one JSON object on stdout
    python tests/sharding_worker.py WORKDIR --process   one of 2 processes x 4 devices, started by
                                                        the first form (JAX_PROCESS_ID etc. set)

XLA fixes the device count when jax first starts, so this runs in fresh processes (pytest's own
process has one device). One run covers every mesh: each check records numbers and the pytest
side asserts on them, so a failure names the mesh and the size of the difference.

The model is a tiny PaliGemma 2 whose widths divide 8 (width 64, 8 heads, MLP 128, vocab 2112), so
fsdp=8 and tensor=8 really split it; its 2 kv heads and 4 vision heads exercise the fall-backs.
The fine-tuning check runs `python -m pali_jax.finetune`'s run() in this process, on one device and
under a mesh, on the same model with the tiny tokenizer and shapes-task data.
The multi-host part runs 2 processes that join through jax.distributed (gloo collectives on CPU)
and use one 8-device mesh across them: each places only its own shards (from safetensors and from
orbax) and they generate together; then they run the fine-tuning entry point together (each
building its own rows of every batch, checkpoints written and restored by both, the export
written by process 0) and resume it. Results are checked against the 8-device process's
single-device runs.
"""

from __future__ import annotations

import os
import sys

PROCESSES = 2
CHILD = "--process" in sys.argv
# Before jax is imported anywhere. Cheap code generation (tests/conftest.py's): every program
# here is compiled once and runs on tiny arrays.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={8 // PROCESSES if CHILD else 8}",
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
])
os.environ["JAX_PLATFORMS"] = "cpu"

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pali_jax.conversion import convert_hf  # noqa: E402
from pali_jax.paligemma import abstract_params  # noqa: E402
from pali_jax import distributed, finetune, sharding, weights  # noqa: E402
from pali_jax.train import programs as training_programs  # noqa: E402
from pali_jax.backend import Policy  # noqa: E402
from pali_jax.config import PaliGemmaConfig  # noqa: E402
from pali_jax.decode import prepare_prompts  # noqa: E402
from pali_jax.generation_config import GenerationConfig  # noqa: E402
from pali_jax.pretrained import PaliGemma  # noqa: E402
from pali_jax.sampling import SamplingParams  # noqa: E402
from pali_jax.train import TrainConfig, Trainer  # noqa: E402
from pali_jax.weights import materialise  # noqa: E402
from pali_jax.weights.big_vision import save_npz  # noqa: E402
from pali_jax.weights.npz import Member  # noqa: E402

# Small enough that the tiny model's matrices are split, large enough that norms and biases stay
# replicated: the per-device bytes check then has both kinds. Set for the whole process (every
# loader, the Trainer and the fine-tuning entry point read it).
sharding.MIN_SHARDED_ELEMENTS = 2048
# Likewise small blocks of rows: loaders then read and place the tiny tensors (embedding rows,
# big_vision's stacked layers) in several blocks, as they do full-size ones.
materialise.BLOCK_BYTES = 16384
# mesh spec -> which loader places the parameters (both paths are covered across the meshes).
MESHES = {"8,1,1": "hf", "1,8,1": "orbax", "2,2,2": "hf", "1,1,2": "orbax"}
BATCH, NEW_TOKENS, BEAMS = 8, 8, 3
MULTIHOST_RUN = "multihost-run"  # the 2-process fine-tuning run's --out, under the work directory
# Tokens per training row: also the fine-tuning check's --max-length (its longest example), so that
# its runs reuse the train steps check_training compiled.
TRAIN_LENGTH = 42
# SGD with momentum: its update is linear in the gradient, so equal gradients give equal
# parameters to rounding. (Adam's g / (|g| + 1e-8) turns gradients that are zero in exact
# arithmetic, e.g. SigLIP's key bias under a shift-invariant softmax, into +-lr from rounding
# noise, which differs between any two reduction orders, sharded or not.)
TRAIN = TrainConfig(steps=2, batch_size=BATCH, optimizer="sgd", momentum=0.9, learning_rate=0.1, schedule="constant",
                    grad_clip=None)


def build_divisible_model():
    """tests/hf_models.py's pg2 with every width a multiple of 8."""
    import hf_models
    import torch
    from transformers import Gemma2Config, PaliGemmaForConditionalGeneration
    from transformers import PaliGemmaConfig as HFPaliGemmaConfig

    text = Gemma2Config(
        vocab_size=hf_models.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=12,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rms_norm_eps=1e-6, initializer_range=0.1,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    cfg = HFPaliGemmaConfig(
        vision_config=hf_models._vision(width=32, heads=4, mlp=64), text_config=text,
        image_token_index=hf_models.IMAGE_TOKEN_ID, projection_dim=64, vocab_size=hf_models.VOCAB_SIZE,
    )
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # as hf_models.build: no zero norms or biases, layers that matter
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if "language_model" in name and "layernorm" in name and "layers." in name:
                p.add_(3.0)
    return model


def prompts(cfg: PaliGemmaConfig, rng) -> dict[str, np.ndarray]:
    """A left-padded batch of prompts of different lengths (image tokens, bos, text)."""
    lengths = rng.integers(2, 10, BATCH)
    width = cfg.num_image_tokens + 1 + lengths.max()
    ids = np.zeros((BATCH, width), np.int32)
    mask = np.zeros((BATCH, width), np.int32)
    for row, n in enumerate(lengths):
        text = rng.integers(3, cfg.image_token_id, n)
        real = np.concatenate([np.full(cfg.num_image_tokens, cfg.image_token_id), [2], text])
        ids[row, width - len(real):], mask[row, width - len(real):] = real, 1
    pixels = rng.uniform(-1, 1, (BATCH, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return {"pixels": pixels, "ids": ids, "mask": mask}


def training_batch(cfg: PaliGemmaConfig, rng) -> dict[str, np.ndarray]:
    """TRAIN_LENGTH tokens a row: image tokens, bos, prefix tokens, 6 suffix tokens; the loss is on the suffix."""
    text = rng.integers(3, cfg.image_token_id, (BATCH, TRAIN_LENGTH - cfg.num_image_tokens - 1))
    ids = np.concatenate([np.full((BATCH, cfg.num_image_tokens), cfg.image_token_id), np.full((BATCH, 1), 2), text], 1)
    types = np.zeros_like(ids)
    types[:, -6:] = 1
    return {
        "pixel_values": rng.uniform(-1, 1, (BATCH, cfg.image_size, cfg.image_size, 3)).astype(np.float32),
        "input_ids": ids.astype(np.int32),
        "token_type_ids": types.astype(np.int32),
        "attention_mask": np.ones_like(ids, np.int32),
        "loss_mask": types.astype(bool),
    }


def max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max(), a, b)
    return float(max(jax.tree.leaves(diffs)))


def shards_diff(arrays, host) -> float:
    """Largest difference between this process's shards of global arrays and the host values."""
    return float(max(
        np.abs(np.asarray(s.data, np.float64) - np.asarray(h, np.float64)[s.index]).max()
        for x, h in zip(jax.tree.leaves(arrays), jax.tree.leaves(host)) for s in x.addressable_shards
    ))


def same_layout(arrays, specs, mesh) -> bool:
    """Does every array lie on the mesh as its PartitionSpec says?"""
    specs = jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P))
    arrays = jax.tree.leaves(arrays)
    return len(specs) == len(arrays) and all(
        NamedSharding(mesh, s).is_equivalent_to(x.sharding, x.ndim) for x, s in zip(arrays, specs)
    )


def split_count(tree) -> int:
    return sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))


def generate_under(pg: PaliGemma, inputs: dict):
    """Generator.generate's own program, called directly to see the final state's layout too."""
    statics, ids, types, mask, stops = prepare_prompts(
        pg.config, inputs["ids"], None, inputs["mask"], GenerationConfig(max_new_tokens=NEW_TOKENS, return_logits=True)
    )
    state = pg.generator._generate(
        statics, pg.params, inputs["pixels"], ids, types, mask, jnp.int32(NEW_TOKENS), SamplingParams.greedy(),
        jax.random.PRNGKey(0), stops,
    )
    return state, pg.generator._output(state, NEW_TOKENS, mask)


def beam_search(pg: PaliGemma, inputs: dict):
    """The batch's best of BEAMS hypotheses per prompt (B * BEAMS cache rows)."""
    return pg.beam_search.search(
        pg.params, inputs["pixels"], inputs["ids"], None, inputs["mask"], beams=BEAMS, max_new_tokens=NEW_TOKENS
    )


# -- 8 devices, one process ------------------------------------------------------------------------
def check_generation(ref: PaliGemma, hf_dir: Path, converted: Path, inputs: dict) -> tuple[dict, object]:
    """Greedy generation (tokens and per-step logits) and beam search under each mesh against one device."""
    want = ref.generator.generate(
        ref.params, inputs["pixels"], inputs["ids"], None, inputs["mask"], max_new_tokens=NEW_TOKENS, return_logits=True
    )
    want_beams = beam_search(ref, inputs)
    recorded = dict(max_new_tokens=NEW_TOKENS, output_attentions=True, output_scores=True)
    want_recorded = ref.generator.generate(ref.params, inputs["pixels"], inputs["ids"], None, inputs["mask"], **recorded)
    out = {}
    for spec, loader in MESHES.items():
        start = time.perf_counter()
        mesh = sharding.make_mesh(spec)
        if loader == "hf":
            cfg, params = weights.load(hf_dir, "float32", mesh=mesh)
        else:
            cfg = ref.config
            params = sharding.restore_sharded(converted / "params", cfg, mesh)
        pg = PaliGemma(cfg, params, jnp.float32, hf_dir, mesh)
        state, got = generate_under(pg, inputs)
        beams = beam_search(pg, inputs)
        out[spec] = {
            "loader": loader,
            "params_equal": max_diff(params, ref.checkpoint_params()) == 0.0,
            "specs_as_rules": same_layout(params, sharding.param_specs(params, mesh), mesh),
            "split_leaves": split_count(params),
            "tokens_equal": bool(np.array_equal(got.tokens, want.tokens) and np.array_equal(got.lengths, want.lengths)),
            "tokens": got.tokens.tolist(),
            "logits_diff": float(np.abs(got.logits - want.logits).max()),
            "cache_k_spec": str(state.cache.k.sharding.spec),
            "cache_as_rules": same_layout(state.cache, sharding.cache_specs(state.cache, mesh), mesh),
            "beam_tokens_equal": bool(
                np.array_equal(beams.tokens, want_beams.tokens) and np.array_equal(beams.lengths, want_beams.lengths)
            ),
            "beam_scores_diff": float(np.abs(beams.scores - want_beams.scores).max()),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if spec == "1,8,1":
            out["fsdp8_bytes"] = param_bytes(params)
        if spec == "2,2,2":  # every mesh axis at once: attentions and scores come back whole
            got = pg.generator.generate(pg.params, inputs["pixels"], inputs["ids"], None, inputs["mask"], **recorded)
            out["recorded"] = {
                name: float(np.abs(getattr(got, name) - getattr(want_recorded, name)).max())
                for name in ("attentions", "prefill_attentions", "logprobs")
            }
    return out, want


def param_bytes(params) -> dict:
    """Per-device parameter bytes under fsdp=8, from the shardings and from the device buffers."""
    report = sharding.memory_report(params)
    device = jax.devices()[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == device)
    return {
        "total": report.total, "per_device": report.per_device, "replicated": report.replicated, "device0_buffers": held
    }


def check_training(cfg: PaliGemmaConfig, host_params, batches) -> dict:
    """Two steps of pali_jax.train's Trainer.step on one device, then the same steps with
    Trainer(mesh=data=2,fsdp=4): the state initialised on its shards, sharded batches."""
    mesh = sharding.make_mesh("data=2,fsdp=4")
    trainer, m_trainer = Trainer(cfg, TRAIN), Trainer(cfg, TRAIN, mesh=mesh)
    state = trainer.init_state(jax.tree.map(jnp.asarray, host_params))
    m_state = m_trainer.init_state(sharding.shard_params(host_params, mesh))
    state_specs = sharding.param_specs(m_state, mesh)
    initial_layout = same_layout(m_state, state_specs, mesh)
    want, got = [], []
    for batch in batches:
        state, metrics = trainer.step(state, trainer.place_batch(batch))
        want.append(float(metrics["loss"]))
    compiled = training_programs(Policy.host()).step._cache_size()
    for batch in batches:
        m_state, metrics = m_trainer.step(m_state, m_trainer.place_batch(batch))
        got.append(float(metrics["loss"]))
    return {
        "losses": got,
        "want_losses": want,
        "params_diff": max_diff(m_state.variables, state.variables),
        "opt_state_diff": max_diff(m_state.opt_state, state.opt_state),
        "moved": max_diff(m_state.variables["params"], host_params),
        "state_kept_layout": initial_layout and same_layout(m_state, state_specs, mesh),
        "mesh_compiles": training_programs(Policy.host()).step._cache_size() - compiled,  # 1 unless step 2 got another layout
        "batch_spec": str(m_trainer.place_batch(batches[0])["input_ids"].sharding.spec),
        "split_leaves": split_count(m_state),
    }


def finetune_run(workdir: Path, out: str, *extra: str) -> finetune.RunResult:
    """`python -m pali_jax.finetune` (its run(), in this process) with TRAIN's settings, on the model
    (WORKDIR/hf) and data (WORKDIR/data) main and check_finetune prepare."""
    argv = ["--model", workdir / "hf", "--train", workdir / "data" / "train.jsonl", "--out", workdir / out,
            "--steps", TRAIN.steps, "--batch-size", TRAIN.batch_size, "--optimizer", TRAIN.optimizer,
            "--momentum", TRAIN.momentum, "--lr", TRAIN.learning_rate, "--schedule", TRAIN.schedule,
            "--grad-clip", 0, "--max-length", TRAIN_LENGTH, "--checkpoint-every", 1, "--no-progress", *extra]
    return finetune.run(finetune.parse_args([str(a) for a in argv]))


def check_finetune(workdir: Path, hf_dir: Path, ref: PaliGemma) -> dict:
    """`python -m pali_jax.finetune` with TRAIN's settings on one device (with --eval: the multi-host
    run's reference) and under --mesh data=2,fsdp=4; then the mesh run again, resumed from its
    step-1 checkpoint."""
    from test_finetune import write_split
    from tokenizer_utils import train_tokenizer

    from pali_jax.checkpoint import TrainCheckpointer

    train_tokenizer(hf_dir)
    train = write_split(workdir / "data", "train", 8, seed=1)  # 16 examples: 2 batches an epoch
    # 3 held-out examples: one eval batch of 8 rows, 5 of them empty (in a 2-process run, one
    # process's whole share).
    (workdir / "data" / "eval.jsonl").write_text("".join(train.read_text().splitlines(keepends=True)[:3]))

    start = time.perf_counter()
    single = finetune_run(workdir, "single", "--eval", workdir / "data" / "eval.jsonl")
    meshed = finetune_run(workdir, "mesh", "--mesh", "data=2,fsdp=4")
    # The exported directories load on one device whatever mesh trained them.
    want, got = (PaliGemma.from_pretrained(r.model_dir).params for r in (single, meshed))
    # The last step again, from the sharded checkpoint before it.
    shutil.rmtree(workdir / "mesh" / "checkpoints" / str(TRAIN.steps))
    resumed = finetune_run(workdir, "mesh", "--mesh", "data=2,fsdp=4", "--resume")
    # That checkpoint restores straight onto the shards, and onto one device as well.
    mesh = sharding.make_mesh("data=2,fsdp=4")
    abstract = abstract_params(ref.config)
    with TrainCheckpointer(workdir / "mesh" / "checkpoints", every=1) as ckpt:
        restored = ckpt.restore(Trainer(ref.config, TRAIN, mesh=mesh).abstract_state(abstract), step=1)
        on_one = ckpt.restore(Trainer(ref.config, TRAIN).abstract_state(abstract), step=1)
    return {
        "losses": [r["loss"] for r in meshed.history],
        "want_losses": [r["loss"] for r in single.history],
        "want_evaluations": single.evaluations,
        "params_diff": max_diff(got, want),
        "moved": max_diff(want, ref.params),
        "resumed_steps": [r["step"] for r in resumed.history],
        "resumed_loss": resumed.history[-1]["loss"],
        "resumed_params_diff": max_diff(PaliGemma.from_pretrained(resumed.model_dir).params, got),
        "restored_as_rules": same_layout(restored, sharding.param_specs(restored, mesh), mesh),
        "restored_split_leaves": split_count(restored),
        "restored_on_one_device": max_diff(on_one, restored) == 0.0
        and {d for x in jax.tree.leaves(on_one) for d in x.devices()} == {jax.devices()[0]},
        "step_compiles": training_programs(Policy.host()).step._cache_size(),  # 2 (one device, the mesh) if check_training's were reused
        "seconds": round(time.perf_counter() - start, 2),
    }


def check_multihost_finetune(workdir: Path) -> dict:
    """The 2-process fine-tuning runs' exports (written by process 0) against the single-device run's."""
    want = PaliGemma.from_pretrained(workdir / "single" / "model").params
    first = PaliGemma.from_pretrained(workdir / MULTIHOST_RUN / "model-first").params
    resumed = PaliGemma.from_pretrained(workdir / MULTIHOST_RUN / "model").params
    return {"params_diff": max_diff(first, want), "resumed_params_diff": max_diff(resumed, first)}


def check_loading(ref: PaliGemma, hf_dir: Path, converted: Path, npz: Path, inputs: dict) -> dict:
    """from_pretrained(mesh=...) on both kinds of directory, in the default (per-layer) layout, and
    its generation; a big_vision .npz onto a mesh against the same file on one device; and a
    bfloat16 sharded restore."""
    mesh = sharding.make_mesh("fsdp=-1")
    from_hf = PaliGemma.from_pretrained(hf_dir, mesh=mesh)
    from_orbax = PaliGemma.from_pretrained(converted, mesh=mesh)
    npz_one = PaliGemma.from_pretrained(npz)
    npz_mesh = PaliGemma.from_pretrained(npz, mesh=sharding.make_mesh("1,4,2"))
    bf16 = sharding.restore_sharded(converted / "params", ref.config, mesh, jnp.bfloat16)
    want_bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), ref.checkpoint_params())
    return {
        "from_pretrained_hf_equal": max_diff(from_hf.params, ref.params) == 0.0 and from_hf.generator.mesh is mesh,
        "from_pretrained_orbax_equal": max_diff(from_orbax.params, ref.params) == 0.0,
        "bf16_equal": max_diff(bf16, want_bf16) == 0.0 and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16)),
        "bf16_split_leaves": split_count(bf16),
        "default_layout": str(from_orbax.layout),
        "default_layout_split_leaves": split_count(from_orbax.params),
        "default_layout_tokens_equal": bool(np.array_equal(generate_under(from_orbax, inputs)[1].tokens,
                                                           generate_under(ref, inputs)[1].tokens)),
        "npz_params_equal": max_diff(npz_mesh.params, npz_one.params) == 0.0,
        "npz_split_leaves": split_count(npz_mesh.params),
        "npz_tokens_equal": bool(np.array_equal(generate_under(npz_mesh, inputs)[1].tokens,
                                                generate_under(npz_one, inputs)[1].tokens)),
    }


def check_fallbacks() -> dict:
    """Specs for the tiny pg1 (MQA: 1 kv head, 4 heads, MLP 96) under tensor=8 and (2,2,2):
    indivisible dimensions must be left whole, and every spec must be valid for its shape."""
    import hf_models

    abstract = abstract_params(PaliGemmaConfig.from_hf(hf_models.tiny_config("pg1").to_dict()))
    out = {}
    for spec in ("1,1,8", "2,2,2"):
        mesh = sharding.make_mesh(spec)
        specs = jax.tree.leaves(sharding.param_specs(abstract, mesh), is_leaf=lambda v: isinstance(v, P))
        flat = {
            "/".join(k.key for k in path): (leaf.shape, s)
            for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], specs)
        }
        sizes = dict(mesh.shape)
        valid = all(all(a is None or shape[i] % sizes[a] == 0 for i, a in enumerate(s)) for shape, s in flat.values())
        attn = ("llm/layers/attn/kv_einsum", "llm/layers/attn/q_einsum")
        out[spec] = {"valid": valid, **{k: str(flat[k][1]) for k in attn}}
    return out


def run_multihost(workdir: Path) -> list[dict]:
    """Starts the 2-process run and returns each process's report."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(PROCESSES)}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(workdir), "--process"], env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(PROCESSES)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        if proc.returncode:
            raise RuntimeError(f"multi-host process failed:\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main(workdir: Path) -> dict:
    start = time.perf_counter()
    assert jax.device_count() == 8, jax.devices()
    import hf_models

    hf_dir = hf_models.save(build_divisible_model(), workdir / "hf", shard_size="100KB")
    converted = convert_hf(hf_dir, workdir / "converted")
    ref = PaliGemma.from_pretrained(hf_dir)
    npz = save_npz(workdir / "pg.npz", ref.config, ref.checkpoint_params())
    rng = np.random.default_rng(0)
    inputs = prompts(ref.config, rng)
    batches = [training_batch(ref.config, rng) for _ in range(2)]
    host_params = jax.tree.map(np.asarray, ref.checkpoint_params())
    result = {"devices": jax.device_count()}
    result["generation"], want = check_generation(ref, hf_dir, converted, inputs)
    result["training"] = check_training(ref.config, host_params, batches)
    result["finetune"] = check_finetune(workdir, hf_dir, ref)
    result["loading"] = check_loading(ref, hf_dir, converted, npz, inputs)
    result["fallbacks"] = check_fallbacks()
    # Single-device references for the multi-host processes.
    np.savez(workdir / "reference.npz", **inputs, tokens=want.tokens, lengths=want.lengths, logits=want.logits)
    result["multihost"] = run_multihost(workdir)
    result["multihost_finetune"] = check_multihost_finetune(workdir)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# -- 2 processes x 4 devices ----------------------------------------------------------------------
def child(workdir: Path) -> dict:
    """One of the multi-host processes: load and generate on a mesh spanning both, then fine-tune."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    joined = distributed.initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
    ref = dict(np.load(workdir / "reference.npz", allow_pickle=False))
    hf_dir, converted = workdir / "hf", workdir / "converted"
    mesh = sharding.make_mesh("2,2,2")  # one mesh over both processes' devices
    cfg, params = weights.load(hf_dir, "float32", mesh=mesh)
    restored = sharding.restore_sharded(converted / "params", cfg, mesh)
    _, host = weights.load(hf_dir, "float32")  # to check this process's shards (tiny: fine on every host)
    _, got = generate_under(PaliGemma(cfg, params, jnp.float32, hf_dir, mesh), ref)
    return {
        "process": jax.process_index(),
        "joined": joined and jax.process_count() == PROCESSES and jax.device_count() == 8,
        "local_shards": {len(x.addressable_shards) for x in jax.tree.leaves(params)} == {jax.local_device_count()},
        "split_leaves": split_count(params),
        "hf_shards_diff": shards_diff(params, host),
        "orbax_shards_diff": shards_diff(restored, host),
        "tokens_equal": bool(np.array_equal(got.tokens, ref["tokens"]) and np.array_equal(got.lengths, ref["lengths"])),
        "logits_diff": float(np.abs(got.logits - ref["logits"]).max()),
        **child_npz(workdir),
        "finetune": child_finetune(workdir),
    }


def child_npz(workdir: Path) -> dict:
    """The big_vision .npz onto tensor=8 across both processes: the embedding's rows are split
    between them, and each reads only its own half of them."""
    reads = []
    read = Member.read
    Member.read = lambda self, start, stop: reads.append((self.name, start, stop)) or read(self, start, stop)
    try:
        _, params = weights.load(workdir / "pg.npz", "float32", mesh=sharding.make_mesh("1,1,8"))
    finally:
        Member.read = read
    _, host = weights.load(workdir / "pg.npz", "float32")
    return {"npz_shards_diff": shards_diff(params, host), "npz_split_leaves": split_count(params),
            "npz_embedding_rows_read": [[start, stop] for name, start, stop in reads
                                        if name == "llm/embedder/input_embedding"]}


def child_finetune(workdir: Path) -> dict:
    """check_finetune's single-device run (with --eval) under --mesh data=2,fsdp=4 across both
    processes; then, its last checkpoint removed, resumed from step 1. The exports are compared by
    the parent (check_multihost_finetune)."""
    mesh_args = ("--mesh", "data=2,fsdp=4")
    printed = io.StringIO()  # what this process prints: process 0 alone speaks
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        first = finetune_run(workdir, MULTIHOST_RUN, *mesh_args, "--eval", workdir / "data" / "eval.jsonl")
        if jax.process_index() == 0:  # export_model returned on every process: the directory is complete
            out = workdir / MULTIHOST_RUN
            shutil.rmtree(out / "checkpoints" / str(TRAIN.steps))
            (out / "model").rename(out / "model-first")
        distributed.wait_for_every_process("resume")
        resumed = finetune_run(workdir, MULTIHOST_RUN, *mesh_args, "--resume")
    return {
        "rows": sharding.process_rows(TRAIN.batch_size, sharding.make_mesh("data=2,fsdp=4")).tolist(),
        "losses": [r["loss"] for r in first.history],
        "evaluations": first.evaluations,
        "resumed_steps": [r["step"] for r in resumed.history],
        "resumed_loss": resumed.history[-1]["loss"],
        "printed": printed.getvalue(),
    }


if __name__ == "__main__":
    report = child(Path(sys.argv[1])) if CHILD else main(Path(sys.argv[1]))
    print(json.dumps(report))
