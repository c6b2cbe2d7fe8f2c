"""The HF -> Flax converter: round trip, key layouts, dtypes, and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import hf_models
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import PaliGemmaForConditionalGeneration

from pali_jax import cli
from pali_jax.checkpoint import read_params, restore_params
from pali_jax.errors import UserError
from pali_jax.paligemma import abstract_params
from pali_jax.pretrained import PaliGemma
from pali_jax.weights import load
from parity import assert_parity
from test_model import hf_forward, make_inputs


def tree_equal(a, b) -> bool:
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(flat_a, flat_b))


def convert_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def test_sharded_round_trip(tiny_models, tokenizer_dir, tmp_path, capsys):
    tiny = tiny_models["pg2"]
    assert len(list(tiny.hf_dir.glob("model-*-of-*.safetensors"))) > 1  # really sharded
    src = tmp_path / "src"
    shutil.copytree(tiny.hf_dir, src)
    shutil.copy(tokenizer_dir / "tokenizer.model", src / "tokenizer.model")
    dst = tmp_path / "converted"
    code, err = convert_cli(capsys, src, dst)
    assert code == 0, err
    assert (dst / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    loaded = PaliGemma.from_pretrained(dst)
    assert loaded.config == tiny.pg.config
    assert tree_equal(loaded.params, tiny.pg.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "src"]  # no temporary directory left


def _rewrite_keys(src, dst, rename):
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    (dst / "model.safetensors").unlink()
    save_file({rename(k): v for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("layout", ["transformers5", "hub_4x", "lm_head"])
def test_key_layouts(tiny_models, tmp_path, layout):
    tiny = tiny_models["pg1"]

    def rename(k: str) -> str:
        if layout == "transformers5":  # model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*
            return "model." + k.replace("language_model.model.", "language_model.")
        if layout == "hub_4x":  # vision_tower.vision_model.*
            return k.replace("vision_tower.", "vision_tower.vision_model.")
        return k

    src = _rewrite_keys(tiny.hf_dir, tmp_path / layout, rename)
    if layout == "lm_head":  # a tied lm_head saved anyway is accepted and ignored
        tensors = load_file(src / "model.safetensors")
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"]
        save_file(tensors, src / "model.safetensors")
    _, params = load(src, "float32")
    assert tree_equal(params, jax.tree.map(np.asarray, tiny.pg.checkpoint_params()))


def test_bfloat16_checkpoint(tmp_path, capsys):
    model = hf_models.build("pg1", seed=7)
    src = hf_models.save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    _, params = load(src)  # auto: the checkpoint's own dtype
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params))
    code, err = convert_cli(capsys, src, tmp_path / "f32", "--dtype", "float32")
    assert code == 0, err
    pg = PaliGemma.from_pretrained(tmp_path / "f32")
    ref_model = PaliGemmaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    ref_model.set_attn_implementation("eager")
    pixels, ids, types = make_inputs(pg, 1, 4, 4)
    assert_parity(pg.forward(pixels, ids, types), hf_forward(ref_model, pixels, ids, types).logits.numpy())
    bf16 = PaliGemma.from_pretrained(tmp_path / "f32", dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(bf16.params))
    logits = np.asarray(bf16.forward(pixels, ids, types))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_read_params_equals_orbax_restore(tiny_models, tmp_path, capsys):
    """Converted checkpoints load through read_params' direct reads (cast on the way); any other
    layout (here orbax's defaults: OCDBT, compressed) through orbax."""
    tiny = tiny_models["pg1"]
    assert convert_cli(capsys, tiny.hf_dir, tmp_path / "converted")[0] == 0
    abstract = abstract_params(tiny.pg.config, jax.numpy.bfloat16)
    want = restore_params(tmp_path / "converted" / "params", abstract)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ocdbt", tiny.pg.checkpoint_params())
    for path in (tmp_path / "converted" / "params", tmp_path / "ocdbt"):
        assert tree_equal(read_params(path, abstract), want)


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(d):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))


def _edit_config(**text):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["text_config"].update(text)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _drop_tensor(d):
    tensors = load_file(d / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")


def _extra_tensor(d):
    tensors = load_file(d / "model.safetensors")
    tensors["language_model.model.layers.0.self_attn.rotary.inv_freq"] = np.zeros(4, np.float32)
    save_file(tensors, d / "model.safetensors")


BAD_INPUTS = {
    "no safetensors": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated": (_truncate, "truncated"),
    "corrupt header": (_corrupt_header, "corrupt"),
    "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "config not json": (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    "width mismatch": (_edit_config(hidden_size=32, head_dim=8), "does not fit"),
    "depth mismatch": (_edit_config(num_hidden_layers=3), "no tensor for llm/layers"),
    "missing tensor": (_drop_tensor, "no tensor for llm/layers/mlp/gating_einsum"),
    "unexpected tensor": (_extra_tensor, "unexpected tensor 'language_model.model.layers.0.self_attn.rotary"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(tiny_models, tmp_path, capsys, case):
    damage, message = BAD_INPUTS[case]
    src = tmp_path / "src"
    shutil.copytree(tiny_models["pg1"].hf_dir, src)
    damage(src)
    code, err = convert_cli(capsys, src, tmp_path / "dst")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no temporary directory


def test_bad_arguments(tiny_models, tmp_path, capsys):
    code, err = convert_cli(capsys, tmp_path / "nowhere", tmp_path / "dst")
    assert code == 2 and "is not a directory" in err
    code, err = convert_cli(capsys, tiny_models["pg1"].hf_dir, tmp_path / "dst", "--dtype", "float16")
    assert code == 2 and "unknown dtype 'float16'" in err
    (tmp_path / "exists").mkdir()
    code, err = convert_cli(capsys, tiny_models["pg1"].hf_dir, tmp_path / "exists")
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_missing_shard_from_the_command_line(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["pg2"].hf_dir, src)
    next(src.glob("model-00002-of-*.safetensors")).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "convert.hf_to_flax", str(src), str(tmp_path / "dst")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "shard model-00002" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "dst").exists()


# -- pali-jax export-big-vision: destinations ------------------------------------------------------
DEMO_MODEL = Path(__file__).resolve().parent.parent / "pali_jax" / "assets" / "demo" / "model"


def _export(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["export-big-vision", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_export_refuses_a_destination_that_is_not_a_regular_file(tmp_path, capsys, kind):
    out = tmp_path / "out.npz"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        try:
            os.mknod(out, 0o600 | stat.S_IFCHR, os.makedev(1, 7))  # what /dev/full is
        except PermissionError:
            pytest.skip("mknod of a character device needs root")
    mode = out.lstat().st_mode
    code, _, err = _export(capsys, DEMO_MODEL, out, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and f"is a {'FIFO' if kind == 'fifo' else 'device'}" in err, err
    assert out.lstat().st_mode == mode and sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_export_refuses_a_destination_inside_the_source(tmp_path, capsys):
    src = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, src)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    code, _, err = _export(capsys, src, src / "x.npz")
    assert code == 2 and err.count("\n") == 1 and "lies inside the source" in err, err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_export_removes_a_killed_exports_temporary(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".a.npz.tmp-{dead.pid}").write_bytes(b"PK half a zip")
    (tmp_path / "a.npz").write_bytes(b"an older export")
    code, out, err = _export(capsys, DEMO_MODEL, tmp_path / "a.npz", "--overwrite")
    assert code == 0 and out == f"wrote {tmp_path / 'a.npz'}\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]
    assert zipfile.ZipFile(tmp_path / "a.npz").testzip() is None  # a whole zip


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused(tiny_models, tmp_path, capsys, value):
    """One NaN (or infinity) anywhere: one line from the converter (exit 2, nothing written) and
    from from_pretrained, as for a big_vision .npz (tests/test_big_vision.py)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_models["pg1"].hf_dir, src)
    tensors = load_file(src / "model.safetensors")
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 2] = value
    save_file(tensors, src / "model.safetensors")
    message = f"tensor {key!r} holds NaN or infinite values: the checkpoint is damaged"
    code, err = convert_cli(capsys, src, tmp_path / "dst")
    assert code == 2 and err == f"error: {message}\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(src)
    assert str(info.value) == message


def test_rows_read_in_blocks_give_the_same_arrays(tiny_models, monkeypatch):
    """Tensors read a few rows at a time (as full-size embeddings are) give what whole reads give."""
    src = tiny_models["pg2"].hf_dir
    _, whole = load(src, "float32")
    monkeypatch.setattr("pali_jax.weights.materialise.BLOCK_BYTES", 1000)
    _, blocks = load(src, "float32")
    assert tree_equal(whole, blocks)
