"""Meshes, sharding rules, sharded loading, generation, beam search, a train step and the
fine-tuning entry point under jax.sharding.

The multi-device checks run once, in a subprocess with 8 CPU devices that itself starts a 2-process
(multi-host) run (tests/sharding_worker.py: XLA fixes the device count when jax starts, and this
process already has one). The rest (mesh
specs, rules on abstract meshes, the 28B memory figures) needs no devices and runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pali_jax import distributed, sharding
from pali_jax.config import preset
from pali_jax.kv_cache import KVCache

WORKER = Path(__file__).with_name("sharding_worker.py")
MESHES = ("8,1,1", "1,8,1", "2,2,2", "1,1,2")
GIB = 1 << 30


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path_factory.mktemp("sharding"))],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- multi-device (subprocess) -------------------------------------------------------------------
@pytest.mark.parametrize("mesh", MESHES)
def test_generation_matches_one_device(worker, mesh):
    r = worker["generation"][mesh]
    assert r["params_equal"] and r["specs_as_rules"], r
    assert r["tokens_equal"], r["tokens"]
    assert r["logits_diff"] <= 1e-4, r["logits_diff"]
    # Beam search (3 beams: 24 cache rows, reordered every step across the batch shards).
    assert r["beam_tokens_equal"] and r["beam_scores_diff"] <= 1e-5, r
    assert r["cache_as_rules"], r["cache_k_spec"]
    # data=8 is pure data parallelism (parameters whole everywhere); every other mesh splits.
    assert (r["split_leaves"] == 0) if mesh == "8,1,1" else (r["split_leaves"] > 0), r


def test_recorded_generation_under_a_mesh(worker):
    diffs = worker["generation"]["recorded"]
    assert diffs["attentions"] <= 1e-5 and diffs["prefill_attentions"] <= 1e-5, diffs
    assert diffs["logprobs"] <= 1e-4, diffs  # log-probabilities, bounded as the logits are


def test_cache_layouts(worker):
    g = worker["generation"]
    assert g["8,1,1"]["cache_k_spec"] == "P(None, 'data')"
    assert g["1,8,1"]["cache_k_spec"] == "P(None, 'fsdp')"
    assert g["2,2,2"]["cache_k_spec"] == "P(None, ('data', 'fsdp'), None, 'tensor')"
    assert g["1,1,2"]["cache_k_spec"] == "P(None, None, None, 'tensor')"


def test_fsdp8_per_device_bytes(worker):
    b = worker["generation"]["fsdp8_bytes"]
    assert 0 < b["replicated"] < b["total"] / 16  # norms and biases stay whole, and they are few
    assert b["per_device"] <= b["total"] / 8 + b["replicated"], b
    assert b["device0_buffers"] == b["per_device"]  # what device 0 really holds


def test_train_step_matches_one_device(worker):
    t = worker["training"]
    assert t["losses"] == pytest.approx(t["want_losses"], rel=1e-5)
    assert t["moved"] > 1e-2  # the steps really changed the parameters...
    assert t["params_diff"] <= 1e-5 and t["opt_state_diff"] <= 1e-4, t  # ...the same way
    assert t["state_kept_layout"] and t["mesh_compiles"] == 1, t
    assert t["batch_spec"] == "P(('data', 'fsdp'),)" and t["split_leaves"] > 0


def test_finetune_entry_point_under_a_mesh(worker):
    """python -m pali_jax.finetune --mesh data=2,fsdp=4 (2 SGD steps) against the same run on one
    device, and its resume from a sharded checkpoint.

    Float32 bar: the mesh sums the batch's gradients in another order (per-shard sums, then an
    all-reduce), so parameters differ by rounding only: a few float32 ulps of weights of magnitude
    up to ~4 (measured 2.4e-7 max abs); 1e-5 is well above that and far below the steps' effect
    (`moved`, ~0.09). The resumed step runs the same program on the restored bits: exactly equal."""
    f = worker["finetune"]
    assert f["losses"] == pytest.approx(f["want_losses"], rel=1e-5)
    assert f["moved"] > 1e-2 and f["params_diff"] <= 1e-5, f
    assert f["resumed_steps"] == [2] and f["resumed_loss"] == f["losses"][-1], f
    assert f["resumed_params_diff"] == 0.0, f
    assert f["restored_as_rules"] and f["restored_split_leaves"] > 0 and f["restored_on_one_device"], f
    assert f["step_compiles"] == 2, f  # the runs reused the steps compiled for one device and for the mesh


def test_sharded_loading(worker):
    """from_pretrained(mesh=...) from HF safetensors, from orbax and from a big_vision .npz (against
    the same .npz on one device); a sharded bfloat16 restore."""
    r = worker["loading"]
    assert r["from_pretrained_hf_equal"] and r["from_pretrained_orbax_equal"], r
    assert r["npz_params_equal"] and r["npz_split_leaves"] > 0 and r["npz_tokens_equal"], r
    assert r["bf16_equal"] and r["bf16_split_leaves"] > 0, r
    # The fast (per-layer) layout under a mesh: its weights split too, and the same tokens.
    assert "stacked=False" in r["default_layout"] and r["default_layout_split_leaves"] > 0, r
    assert r["default_layout_tokens_equal"], r


def test_multihost_loading_and_generation(worker):
    """2 processes x 4 devices, one mesh: each process holds and fills only its own shards (from
    safetensors, from orbax and from a big_vision .npz), and together they generate what one
    device does. Under tensor=8 the .npz embedding's 2000 rows are split between the processes:
    each reads only its own 1000."""
    reports = worker["multihost"]
    assert [r["process"] for r in reports] == [0, 1]
    for r in reports:
        assert r["joined"] and r["local_shards"] and r["split_leaves"] > 0, r
        assert r["hf_shards_diff"] == 0.0 and r["orbax_shards_diff"] == 0.0, r
        assert r["npz_shards_diff"] == 0.0 and r["npz_split_leaves"] > 0, r
        assert r["tokens_equal"] and r["logits_diff"] <= 1e-4, r
    assert [r["npz_embedding_rows_read"] for r in reports] == [[[0, 1000]], [[1000, 2000]]]


def test_multihost_finetune(worker):
    """python -m pali_jax.finetune --mesh data=2,fsdp=4 across 2 processes x 4 devices (2 SGD steps,
    --eval) against the same run on one device: each process builds only its rows of every batch,
    and together they train the same model. Float32 bar as in test_finetune_entry_point_under_a_mesh
    (the gradients' sums are reduced in another order). Then the resume from the step-1
    checkpoint, which both processes restore their shards of: the same program on the same bits."""
    f, want = worker["multihost_finetune"], worker["finetune"]
    assert f["params_diff"] <= 1e-5 and f["resumed_params_diff"] == 0.0, f
    assert [r["finetune"]["rows"] for r in worker["multihost"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for r in worker["multihost"]:
        t = r["finetune"]
        assert t["losses"] == pytest.approx(want["want_losses"], rel=1e-6, abs=1e-6), t
        assert t["resumed_steps"] == [2] and t["resumed_loss"] == t["losses"][-1], t
        # Eval loss (to the 4 decimals printed) and the generation scores, at steps 0 and 2. The one
        # eval batch holds 3 examples in 8 rows: process 1's share (rows 4..7) is all padding.
        assert len(t["evaluations"]) == len(want["want_evaluations"]) == 2, t
        for got, expected in zip(t["evaluations"], want["want_evaluations"]):
            (loss, rest), (want_loss, want_rest) = (line.removeprefix("eval loss ").split(";", 1)
                                                    for line in (got, expected))
            assert float(loss) == pytest.approx(float(want_loss), abs=1.5e-4) and rest == want_rest, (got, expected)
    first, second = (r["finetune"]["printed"] for r in worker["multihost"])
    assert "step 2: eval loss" in first and "wrote" in first and second == "", (first, second)


def test_indivisible_dimensions_stay_whole(worker):
    """tests/hf_models.py's pg1 (1 kv head, 4 heads) cannot split its heads 8 ways."""
    f = worker["fallbacks"]
    assert f["1,1,8"]["valid"] and f["2,2,2"]["valid"]
    assert f["1,1,8"]["llm/layers/attn/q_einsum"] == "P()"
    assert f["2,2,2"]["llm/layers/attn/q_einsum"] == "P(None, 'fsdp', 'tensor')"  # [L, D, N, H]
    assert f["2,2,2"]["llm/layers/attn/kv_einsum"] == "P(None, 'fsdp')"  # [L, D, 2, K=1, H]: D over fsdp


# -- no devices needed -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, sizes",
    [
        ("data=2,fsdp=4", {"data": 2, "fsdp": 4, "tensor": 1}),
        ("tensor=8", {"data": 1, "fsdp": 1, "tensor": 8}),
        ("2,2,2", {"data": 2, "fsdp": 2, "tensor": 2}),
        ("1,8", {"data": 1, "fsdp": 8, "tensor": 1}),
        ("fsdp=-1,tensor=2", {"data": 1, "fsdp": -1, "tensor": 2}),
        ({"fsdp": 4}, {"data": 1, "fsdp": 4, "tensor": 1}),
    ],
)
def test_parse_mesh(spec, sizes):
    assert sharding.parse_mesh(spec) == sizes


@pytest.mark.parametrize("bad", ["", "model=2", "data=2,4", "1,2,3,4", "data=x", "data=-1,fsdp=-1", "fsdp=0"])
def test_bad_mesh_specs(bad):
    with pytest.raises(sharding.MeshError):
        sharding.parse_mesh(bad)


def test_make_mesh_on_this_process():
    mesh = sharding.make_mesh("fsdp=-1")
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(sharding.MeshError, match="needs"):
        sharding.make_mesh({"data": jax.device_count() + 1})


def test_initialize_distributed_only_when_launched(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.initialize_distributed() is False


def _specs(name: str, mesh: str) -> dict[str, P]:
    abstract = sharding.abstract_sharded_params(preset(name), sharding.abstract_mesh(mesh), jnp.bfloat16)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {"/".join(k.key for k in path): leaf.sharding.spec for path, leaf in flat}


def test_rules_on_a_real_shape():
    """paligemma2-10b under data=2, fsdp=4, tensor=2: heads and MLP width over tensor, the width
    over fsdp, the layer axis never split, norms whole."""
    s = _specs("paligemma2-10b-224", "2,4,2")
    assert s["llm/layers/attn/q_einsum"] == P(None, "fsdp", "tensor")  # [L, D, N, H]
    assert s["llm/layers/attn/kv_einsum"] == P(None, "fsdp", None, "tensor")  # [L, D, 2, K, H]
    assert s["llm/layers/attn/attn_vec_einsum"] == P(None, "tensor", None, "fsdp")  # [L, N, H, D]
    assert s["llm/layers/mlp/gating_einsum"] == P(None, "fsdp", None, "tensor")  # [L, D, 2, F]
    assert s["llm/layers/mlp/linear"] == P(None, "tensor", "fsdp")  # [L, F, D]
    assert s["llm/embedder/input_embedding"] == P("tensor", "fsdp")  # [V, D]
    assert s["img/Transformer/encoderblock/Dense_0/kernel"] == P(None, "fsdp", "tensor")  # [L, W, F]
    assert s["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == P(None, "fsdp", "tensor")
    assert s["llm/layers/pre_attention_norm/scale"] == P()
    assert s["img/head/kernel"] == P(None, "fsdp")  # [W, D]: no tensor rule, largest dividing dim


def test_optimizer_state_follows_the_parameters():
    mesh = sharding.abstract_mesh("1,4,2")
    params = {"llm": {"layers": {"mlp": {"linear": jax.ShapeDtypeStruct((2, 1024, 512), jnp.float32)}}}}
    state = jax.eval_shape(optax.adam(1e-3).init, params)
    specs = jax.tree.leaves(sharding.param_specs(state, mesh), is_leaf=lambda x: isinstance(x, P))
    assert specs == [P(), P(None, "tensor", "fsdp"), P(None, "tensor", "fsdp")]  # count, mu, nu


def test_cache_and_batch_specs_fall_back():
    mesh = sharding.abstract_mesh("2,2,2")
    cache = jax.eval_shape(lambda: KVCache.init(preset("paligemma-3b-224").text, 6, 32))  # 1 kv head, 6 rows
    specs = sharding.cache_specs(cache, mesh)
    assert specs.k == P(None, "data") and specs.valid == P("data")  # 6 rows divide data=2, not 4
    assert sharding.batch_spec((3, 5), mesh) == P()  # 3 rows divide nothing: replicated
    assert sharding.batch_spec((8, 5), mesh) == P(("data", "fsdp"))


@pytest.mark.parametrize("mesh", ["fsdp=8", "tensor=8"])
def test_28b_bfloat16_fits_eight_ways(mesh):
    """PaliGemma 2 28B in bfloat16 fits eight devices: per-device parameter memory, no weights."""
    cfg = preset("paligemma2-28b-224")
    report = sharding.memory_report(sharding.abstract_sharded_params(cfg, sharding.abstract_mesh(mesh), jnp.bfloat16))
    print("\n".join(report.lines()))
    assert report.total == pytest.approx(51.50 * GIB, rel=1e-3)
    assert report.per_device <= report.total / 8 + report.replicated
    assert report.per_device < 6.5 * GIB and report.replicated < 0.02 * GIB
