"""The HF -> Flax converter: round trip, key layouts, dtypes, and every kind of bad input."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
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
from hostile import (
    CONVERT_BAD,
    DESTINATIONS,
    _cwd_with_files,
    assert_one_line_error,
    call,
    convert_main,
    listing,
    src,  # noqa: F401  (fixtures)
)
from parity import assert_parity
from safetensors.numpy import load_file, save_file
from test_paligemma import hf_forward, make_inputs
from transformers import PaliGemmaForConditionalGeneration

from benchmarks import kill_points
from pali_jax import cli
from pali_jax.checkpoint import read_params, restore_params
from pali_jax.errors import UserError
from pali_jax.model_dir import verify
from pali_jax.paligemma import abstract_params
from pali_jax.pretrained import PaliGemma
from pali_jax.weights import load

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("case", sorted(CONVERT_BAD))
def test_convert_refuses(src, tmp_path, capsys, case):
    damage, message = CONVERT_BAD[case]
    damage(src)
    code, out, err = call(convert_main, [src, tmp_path / "dst"], capsys)
    assert_one_line_error(code, err, message)
    assert out == "" and listing(tmp_path) == listing(tmp_path)  # (stable)
    assert not (tmp_path / "dst").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("case", sorted(DESTINATIONS))
def test_convert_refuses_destination(src, tmp_path, capsys, monkeypatch, case):
    dst, message = DESTINATIONS[case]
    work = _cwd_with_files(tmp_path)
    monkeypatch.chdir(work)
    before_src, before_work = listing(src), listing(work)
    code, _, err = call(convert_main, [src, dst.format(src=src), "--overwrite"], capsys)
    assert_one_line_error(code, err, message)
    assert listing(src) == before_src and listing(work) == before_work
    assert (work / "keep" / "precious.txt").read_text() == "do not delete"


def test_convert_existing_destination_needs_overwrite(src, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    code, _, err = call(convert_main, [src, tmp_path / "dst"], capsys)
    assert_one_line_error(code, err, "already exists (pass --overwrite")


@pytest.mark.parametrize("args, message", [
    (["{nowhere}", "{dst}"], "is not a directory"),
    (["{file}", "{dst}"], "is not a directory"),
    (["{src}", "{dst}", "--dtype", "float16"], "unknown dtype 'float16'"),
    (["{src}", "{dst}", "--dtype", ""], "unknown dtype ''"),
])
def test_convert_bad_arguments(src, tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    fill = dict(nowhere=tmp_path / "nowhere", dst=tmp_path / "dst", file=tmp_path / "file", src=src)
    code, _, err = call(convert_main, [a.format(**fill) for a in args], capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "dst").exists()


def test_convert_refuses_a_destination_being_written(src, tmp_path, capsys):
    """A second writer of the same destination fails at once (the lock), leaving the first's work."""
    lock = tmp_path / ".dst.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, _, err = call(convert_main, [src, tmp_path / "dst"], capsys)
    finally:
        os.close(fd)
    assert_one_line_error(code, err, "another process is writing")
    assert not (tmp_path / "dst").exists()


def test_convert_overwrite_replaces_a_conversion_and_cleans_stale_temporaries(src, tmp_path, capsys):
    """Valid work around the refusals: --overwrite replaces an earlier conversion, and temporary
    directories of killed conversions (dead PIDs) are removed; a live process's one is kept."""
    dst = tmp_path / "dst"
    assert call(convert_main, [src, dst], capsys)[0] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".dst.tmp-{dead.pid}" / "params").mkdir(parents=True)
    (tmp_path / f".dst.old-{dead.pid}").mkdir()
    (tmp_path / f".dst.tmp-{os.getppid()}").mkdir()  # alive: pytest's parent
    code, out, err = call(convert_main, [src, dst, "--overwrite"], capsys)
    assert code == 0 and err == "" and out == f"wrote {dst}\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "dst", f".dst.tmp-{os.getppid()}"])
    assert verify(dst) > 3


@pytest.mark.parametrize("trial", range(3))
def test_conversion_killed_at_a_random_point(checkpoint, tmp_path, trial):
    """SIGKILL / SIGINT somewhere in the reading and writing: DST absent or complete, SIGINT in
    one line, and the next conversion succeeds and cleans up after the killed one."""
    rng = np.random.default_rng(100 + trial)
    sig = (signal.SIGKILL, signal.SIGINT, signal.SIGKILL)[trial]
    record = kill_points.conversion_trial(checkpoint["hf_dir"], tmp_path / "work", float(rng.uniform(1.0, 4.0)), sig)
    assert record["problems"] == [], record


def test_two_conversions_racing_into_one_destination(checkpoint, tmp_path):
    """Both start before either finishes: one writes DST, the other fails in one line; DST verifies."""
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-m", "convert.hf_to_flax", str(checkpoint["hf_dir"]), str(dst)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    [err] = [err for code, err in results if code == 2]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert any(m in err for m in ("already exists", "another process is writing", "appeared while")), err
    assert verify(dst) > 3 and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_full_disk_is_one_line_and_leaves_nothing(checkpoint, tmp_path):
    """A file size limit (`ulimit -f`, SIGXFSZ ignored so that writes fail instead of killing)
    smaller than the largest parameter array stands for a full disk."""
    convert = f"{sys.executable} -m convert.hf_to_flax {checkpoint['hf_dir']} {tmp_path / 'dst'}"
    proc = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 100; exec {convert}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "ulimit -f" in proc.stderr
    assert list(tmp_path.iterdir()) == []
