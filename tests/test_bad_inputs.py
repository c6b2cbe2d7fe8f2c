"""The bad-input matrix: every entry point against hostile files, configs, images, prompts and data.

Entry points: `pali-jax convert`, `pali-jax verify`, `pali-jax generate`,
`python -m pali_jax.finetune` (called in-process through their `main`, as the console does) and
the Python API (`PaliGemma.from_pretrained`, `pg.forward`, `pg.tokenizer`, `pg.generate`, the
processor and the data reader). Every bad case asserts: exit code 2 (CLI) or `UserError` (API),
exactly one line on stderr without a traceback, and nothing left in the output directory; the
cases that must work (odd but valid images, prompts with `<loc>` / `<eos>`, good images beside bad
ones with `--skip-bad-images`) assert the right result. One tiny model serves every case
(conftest's `checkpoint`); almost no case compiles a model.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
from safetensors.numpy import load_file, save_file

from pali_jax import cli, finetune, generate_command
from pali_jax.model_dir import verify as verify_dir
from pali_jax.data import read_jsonl
from pali_jax.errors import UserError
from pali_jax.model_dir import MANIFEST_FILE
from pali_jax.pretrained import PaliGemma
from pali_jax.processor import load_image, preprocess_images

ROOT = Path(__file__).resolve().parent.parent
READ_ONLY = Path("/sys")  # mkdir fails there even for root, which ignores file modes
LONG_TEXT = "a red circle " * 3400  # 10,200 words: more tokens than the tiny model's 8192 positions


# -- helpers -----------------------------------------------------------------------------------
def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err, err


def _command(name: str) -> Callable[[list[str]], int]:
    return lambda argv: cli.main([name, *argv])


convert_main, verify_main, generate_main, finetune_main = map(_command, ("convert", "verify", "generate", "finetune"))


def call(main: Callable[[list[str]], int], args, capsys) -> tuple[int, str, str]:
    """Runs an entry point's main in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(directory: Path) -> list[str]:
    """Every name under `directory`, hidden ones included."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (1-bit) but holds almost no data: what a decompression
    bomb looks like from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def images(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Good and bad image files."""
    d = tmp_path_factory.mktemp("images")
    good = checkpoint["images"][0]
    png = good.read_bytes()
    jpg = d / "good.jpg"
    PIL.Image.open(good).convert("RGB").save(jpg, quality=90)
    out = {"good": good}
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("hello, I am not an image")
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "truncated.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (d / "header-only.png").write_bytes(png[:40])
    (d / "random.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    png_header(d / "bomb.png", 20000, 20000)
    (d / "folder.png").mkdir()
    for name in ("zero.png", "text.png", "truncated.png", "truncated.jpg", "header-only.png", "random.jpg",
                 "bomb.png", "folder.png"):
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def pg(checkpoint) -> PaliGemma:
    return PaliGemma.from_pretrained(checkpoint["converted"])


# == 1. the converter ==========================================================================
def _rewrite_tensors(d: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def _edit_json(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edits the JSON file `name` in place (`edit` changes the dict; what it returns is ignored)."""
    def damage(d: Path) -> None:
        cfg = json.loads((d / name).read_text())
        edit(cfg)
        (d / name).write_text(json.dumps(cfg))
    return damage


def _text(**fields) -> Callable[[Path], None]:
    return _edit_json("config.json", lambda c: c["text_config"].update(fields))


def _vision(**fields) -> Callable[[Path], None]:
    return _edit_json("config.json", lambda c: c["vision_config"].update(fields))


def _top(**fields) -> Callable[[Path], None]:
    return _edit_json("config.json", lambda c: c.update(fields))


def _drop(*path: str) -> Callable[[Path], None]:
    def edit(c):
        for part in path[:-1]:
            c = c[part]
        del c[path[-1]]
    return _edit_json("config.json", edit)


def _set_tensor(key_end: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def edit(tensors):
        key = next(k for k in tensors if k.endswith(key_end))
        tensors[key] = make(tensors[key])
    return lambda d: _rewrite_tensors(d, edit)


def _with_nan(w: np.ndarray, value=np.nan) -> np.ndarray:
    w = w.copy()
    w.flat[3] = value
    return w


def _crop_vocab(d: Path) -> None:
    """A consistent model with 1500 rows: fewer than the tokenizer's 2000 pieces."""
    def edit(tensors):
        key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
        tensors[key] = np.ascontiguousarray(tensors[key][:1500])
    _rewrite_tensors(d, edit)
    def edit(c):
        c["text_config"]["vocab_size"] = 1500
        c["image_token_index"] = 1499
    _edit_json("config.json", edit)(d)


def _header(data: bytes) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        raw = (d / "model.safetensors").read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        body = raw[8 + header_len:]
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(data)) + data + body)
    return damage


def _patch_bytes(path: Path, at: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at : at + len(data)] = data
    path.write_bytes(bytes(raw))


def _header_entry(**meta) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        raw = (d / "model.safetensors").read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        key = sorted(k for k in header if k != "__metadata__")[0]
        header[key].update(meta)
        data = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + header_len:])
    return damage


def _index(content: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        (d / "model.safetensors.index.json").write_text(content)
    return damage


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _replace_with_dir(name: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()
    return damage


def _truncate_to(n: int | None) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2 if n is None else n])
    return damage


CONVERT_BAD = {
    # safetensors
    "safetensors missing": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "safetensors empty": (_write("model.safetensors", b""), "truncated (no header)"),
    "safetensors is a folder": (_replace_with_dir("model.safetensors"), "is not a file"),
    "safetensors truncated to half": (_truncate_to(None), "truncated"),
    "safetensors truncated to 7 bytes": (_truncate_to(7), "truncated (no header)"),
    "safetensors header length too big": (lambda d: _patch_bytes(d / "model.safetensors", 0, struct.pack("<Q", 10**12)),
                                          "truncated or corrupt (header of 1000000000000 bytes"),
    "safetensors header not json": (_header(b"\xff" * 64), "corrupt header (not JSON)"),
    "safetensors header a list": (_header(b"[1, 2, 3]"), "not a JSON object"),
    "safetensors header bytes of a tensor wrong": (_header_entry(shape=[3, 3, 3]), "bytes for shape"),
    "safetensors unknown dtype": (_header_entry(dtype="F8_E4M3"), "corrupt entry"),
    "safetensors negative offsets": (_header_entry(data_offsets=[-8, 0]), "corrupt entry"),
    "safetensors offsets past the end": (_header_entry(data_offsets=[10**9, 10**9 + 4], shape=[1]), "past the end"),
    "safetensors shape not a list": (_header_entry(shape="big"), "corrupt entry"),
    "index not json": (_index("{oops"), "not a valid safetensors index"),
    "index a list": (_index("[]"), "not a valid safetensors index"),
    "index names a missing shard": (_index(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})),
                                    "shard model-00002-of-00002.safetensors"),
    # config.json
    "config missing": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "config is a folder": (_replace_with_dir("config.json"), "cannot read"),
    "config not json": (_write("config.json", b"{oops"), "not valid JSON"),
    "config binary": (_write("config.json", b"\xff\xfe\x00"), "config.json"),
    "config a list": (_write("config.json", b"[1, 2]"), "must hold a JSON object, got list"),
    "config a string": (_write("config.json", b'"paligemma"'), "must hold a JSON object, got str"),
    "config empty object (HF class defaults)": (_write("config.json", b"{}"), "vision_use_head is true"),
    "config wrong model_type": (_top(model_type="llava"), "model_type is 'llava'"),
    "config vision_config a list": (_top(vision_config=[1]), "bad value in config.json"),
    "config text_config a number": (_top(text_config=7), "bad value in config.json"),
    "config text model_type gemma3": (_text(model_type="gemma3"), "gemma3"),
    "config heads 'four'": (_text(num_attention_heads="four"), "num_heads must be a positive integer, got 'four'"),
    "config heads 0": (_text(num_attention_heads=0), "num_heads must be a positive integer, got 0"),
    "config heads -4": (_text(num_attention_heads=-4), "got -4"),
    "config heads 4.5": (_text(num_attention_heads=4.5), "got 4.5"),
    "config heads true": (_text(num_attention_heads=True), "got True"),
    "config heads null": (_text(num_attention_heads=None), "got None"),
    "config kv heads not a divisor": (_text(num_key_value_heads=3), "not a multiple of num_kv_heads 3"),
    "config rms_norm_eps -1": (_text(rms_norm_eps=-1), "rms_norm_eps must be a positive finite number, got -1"),
    "config rms_norm_eps a string": (_text(rms_norm_eps="small"), "rms_norm_eps"),
    "config head_dim 0": (_text(head_dim=0), "head_dim must be a positive integer"),
    "config depth 'two'": (_text(num_hidden_layers="two"), "depth must be a positive integer"),
    "config vocab -1": (_text(vocab_size=-1), "vocab_size must be a positive integer"),
    "config max positions 0": (_text(max_position_embeddings=0), "max_positions must be a positive integer"),
    "config rope theta a string": (_text(rope_parameters={"rope_theta": "fast"}), "bad value in config.json"),
    "config softcap negative": (_text(final_logit_softcapping=-1.0), "final_logit_softcap"),
    "config activation relu": (_text(hidden_activation="relu", hidden_act="relu"), "not a GELU variant"),
    "config eos id a string": (_text(eos_token_id="x"), "eos_token_ids[0] must be a token id"),
    "config eos list empty": (_text(eos_token_id=[]), "eos_token_ids must be a non-empty"),
    "config image token out of vocab": (_top(image_token_index=10**6), "image_token_id must be a token id"),
    "config vision heads 0": (_vision(num_attention_heads=0), "SiglipConfig.num_heads must be a positive integer"),
    "config vision heads not dividing width": (_vision(num_attention_heads=5), "not a multiple of num_heads 5"),
    "config vision eps negative": (_vision(layer_norm_eps=-1e-6), "layer_norm_eps"),
    "config vision image not square": (_vision(image_size=[16, 32]), "is not square"),
    "config vision image smaller than a patch": (_vision(image_size=2), "smaller than patch_size"),
    "config vision_use_head": (_vision(vision_use_head=True), "vision_use_head"),
    "config field missing: text hidden_size": (_drop("text_config", "hidden_size"), "does not fit"),
    "config field missing: vision patch_size": (_drop("vision_config", "patch_size"), "does not fit"),
    # shapes and tensors
    "config width disagrees with weights": (_text(hidden_size=32, head_dim=8), "does not fit"),
    "config depth disagrees with weights": (_text(num_hidden_layers=5), "sliding_layers has 3 entries for 5 layers"),
    "config depth disagrees with weights and layer_types": (_text(num_hidden_layers=5, layer_types=["full_attention"] * 5),
                                                            "no tensor for llm/layers"),
    "config vocab disagrees with weights": (_text(vocab_size=4000), "does not fit"),
    "config vision width disagrees": (_vision(hidden_size=64), "does not fit"),
    "int32 weight": (_set_tensor("norm.weight", lambda w: w.astype(np.int32)), "is int32: PaliGemma weights are floating"),
    "int64 weight": (_set_tensor("linear.bias", lambda w: w.astype(np.int64)), "is int64"),
    "bool weight": (_set_tensor("post_layernorm.bias", lambda w: w > 0), "is bool"),
    "NaN weight": (_set_tensor("embed_tokens.weight", _with_nan), "NaN or infinite"),
    "inf weight": (_set_tensor("layers.0.mlp.down_proj.weight", lambda w: _with_nan(w, np.inf)), "NaN or infinite"),
    "NaN in a vision weight": (_set_tensor("patch_embedding.weight", _with_nan), "NaN or infinite"),
    "missing tensor": (lambda d: _rewrite_tensors(d, lambda t: t.pop(next(k for k in t if k.endswith("layers.1.mlp.up_proj.weight")))),
                       "no tensor for llm/layers/mlp/gating_einsum"),
    "unexpected tensor": (lambda d: _rewrite_tensors(d, lambda t: t.update({"foo.bar": np.zeros(2, np.float32)})),
                          "unexpected tensor 'foo.bar'"),
    # tokenizer.model
    "tokenizer empty": (_write("tokenizer.model", b""), "cannot load tokenizer model"),
    "tokenizer random bytes": (_write("tokenizer.model", np.random.default_rng(1).bytes(2048)), "cannot load tokenizer model"),
    "tokenizer is a folder": (_replace_with_dir("tokenizer.model"), "tokenizer model not found"),
    "tokenizer bigger than the vocabulary": (_crop_vocab, "2000 pieces, more than the model's vocabulary of 1500"),
    "tokenizer of another model (bos id)": (_text(bos_token_id=3), "<bos>/<eos> ids 2/1, config.json says 3/1"),
}


@pytest.fixture
def src(checkpoint, tmp_path) -> Path:
    """A private copy of the tiny HF checkpoint (with its tokenizer) to damage."""
    out = tmp_path / "in" / "src"  # a level down: so that its parent is not above the working directory
    shutil.copytree(checkpoint["hf_dir"], out)
    return out


@pytest.mark.parametrize("case", sorted(CONVERT_BAD))
def test_convert_refuses(src, tmp_path, capsys, case):
    damage, message = CONVERT_BAD[case]
    damage(src)
    code, out, err = call(convert_main, [src, tmp_path / "dst"], capsys)
    assert_one_line_error(code, err, message)
    assert out == "" and listing(tmp_path) == listing(tmp_path)  # (stable)
    assert not (tmp_path / "dst").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def _cwd_with_files(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "keep").mkdir(parents=True)
    (work / "keep" / "precious.txt").write_text("do not delete")
    return work


DESTINATIONS = {
    # name: (destination as given, relative to the working directory "work", message)
    "empty string": ("", "empty string"),
    "blank string": ("  ", "empty string"),
    "current directory": (".", "current directory or one above it"),
    "current directory, spelled ./": ("./", "current directory or one above it"),
    "parent directory": ("..", "current directory or one above it"),
    "the source": ("{src}", "is or contains the source"),
    "the source, spelled differently": ("{src}/../src", "is or contains the source"),
    "a folder holding the source": ("{src}/..", "is or contains the source"),
    "a folder that is not a model": ("keep", "neither empty nor a pali-jax model directory"),
    "a file": ("keep/precious.txt", "is not a directory"),
    "under a read-only folder": (f"{READ_ONLY}/pali-jax-out", "cannot"),
}


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
    assert verify_dir(dst) > 3


# == 2. loading a converted directory, and convert.verify ======================================
def _no_manifest(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """The damage on a directory without a manifest (older conversions, the demo model), so that
    the check behind the manifest's answers."""
    def both(d: Path) -> None:
        (d / MANIFEST_FILE).unlink()
        damage(d)
    return both


def _config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return _no_manifest(_edit_json("pali_jax_config.json", edit))


def _chunk(d: Path, leaf: str = "llm.layers.mlp.linear") -> Path:
    return next(p for p in (d / "params" / leaf).iterdir() if not p.name.startswith("."))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def _swap(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:4] = bytes(255 - b for b in data[:4])
    path.write_bytes(bytes(data))


LOAD_BAD = {
    "config not json": (_no_manifest(_write("pali_jax_config.json", b"{oops")), "is not valid JSON"),
    "config a list": (_no_manifest(_write("pali_jax_config.json", b"[]")), "must hold a JSON object, got list"),
    "config binary": (_no_manifest(_write("pali_jax_config.json", b"\xff\xfe")), "cannot read"),
    "config missing 'text'": (_config(lambda c: c.pop("text")), "missing field 'text'"),
    "config missing a text field": (_config(lambda c: c["text"].pop("width")), "missing field text.width"),
    "config unknown field": (_config(lambda c: c["text"].update(colour="red")), "colour"),
    "config text a list": (_config(lambda c: c.update(text=[1])), "pali_jax_config.json"),
    "config heads 'four'": (_config(lambda c: c["text"].update(num_heads="four")), "got 'four'"),
    "config heads 0": (_config(lambda c: c["text"].update(num_heads=0)), "num_heads must be a positive integer, got 0"),
    "config rms_norm_eps -1": (_config(lambda c: c["text"].update(rms_norm_eps=-1)), "rms_norm_eps"),
    "config eos ids empty": (_config(lambda c: c.update(eos_token_ids=[])), "eos_token_ids"),
    "config shapes disagree with params": (_config(lambda c: c["text"].update(mlp_dim=128)), "the config does not belong to these parameters"),
    "params missing": (lambda d: shutil.rmtree(d / "params"), "no params/ directory"),
    "params a file": (lambda d: (shutil.rmtree(d / "params"), (d / "params").write_text("x")), "no params/ directory"),
    "chunk missing": (lambda d: _chunk(d).unlink(), "is missing"),
    "chunk missing, no manifest": (_no_manifest(lambda d: _chunk(d).unlink()), "the checkpoint is incomplete"),
    "chunk truncated": (lambda d: _cut(_chunk(d)), "the manifest says"),
    "chunk truncated, no manifest": (_no_manifest(lambda d: _cut(_chunk(d))), "the checkpoint is truncated"),
    "chunk emptied": (lambda d: _chunk(d, "llm.embedder.input_embedding").write_bytes(b""), "the manifest says"),
    "orbax _METADATA missing": (_no_manifest(lambda d: (d / "params" / "_METADATA").unlink()), "_METADATA is missing"),
    "orbax _METADATA damaged": (_no_manifest(_write("params/_METADATA", b"\x00garbage")), "_METADATA is missing or damaged"),
    "zarr metadata damaged": (_no_manifest(lambda d: (d / "params" / "llm.final_norm.scale" / ".zarray").write_text("{")),
                              "cannot restore the parameters"),
    "manifest not json": (_write(MANIFEST_FILE, b"{"), "manifest.json is damaged"),
    "manifest lists a missing file": (_edit_json(MANIFEST_FILE, lambda m: m["files"].update({"gone.bin": {"size": 1, "sha256": "0" * 64}})),
                                      "gone.bin is missing"),
    "manifest entries not objects": (_edit_json(MANIFEST_FILE, lambda m: m["files"].update(dict.fromkeys(m["files"], 1))),
                                     "manifest.json is damaged"),
}


@pytest.fixture
def converted(checkpoint, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(checkpoint["converted"], out)
    return out


@pytest.mark.parametrize("case", sorted(LOAD_BAD))
def test_from_pretrained_refuses(converted, case):
    damage, message = LOAD_BAD[case]
    damage(converted)
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(converted)
    assert message in str(info.value) and "\n" not in str(info.value), info.value


@pytest.mark.parametrize("case", ["config a list", "params missing", "chunk truncated", "chunk missing, no manifest",
                                  "manifest entries not objects"])
def test_run_generate_refuses_a_damaged_model(converted, images, capsys, case):
    damage, message = LOAD_BAD[case]
    damage(converted)
    code, out, err = call(generate_main, ["--model", converted, "--image", images["good"], "--no-compilation-cache"], capsys)
    assert_one_line_error(code, err, message)
    assert out == ""


@pytest.mark.parametrize("path, message", [
    ("{tmp}/empty", "neither a pali-jax directory"),
    ("{tmp}/a/b/c", "not a local directory, and not a hub id"),
    ("nobody/no-such-model", "cannot download nobody/no-such-model"),
    ("", "neither a pali-jax directory"),
])
def test_from_pretrained_refuses_paths(tmp_path, monkeypatch, path, message):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message):
        PaliGemma.from_pretrained(path.format(tmp=tmp_path))


def test_from_pretrained_refuses_a_bad_dtype(checkpoint):
    with pytest.raises(UserError, match="unknown dtype 'float16'"):
        PaliGemma.from_pretrained(checkpoint["converted"], dtype="float16")


@pytest.mark.parametrize("case", ["NaN weight", "int32 weight", "config heads 'four'", "safetensors truncated to half"])
def test_from_pretrained_of_an_hf_dir_refuses(src, case):
    damage, message = CONVERT_BAD[case]
    damage(src)
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(src)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_demo_model_has_no_manifest_and_loads():
    demo = ROOT / "pali_jax" / "assets" / "demo" / "model"
    assert not (demo / MANIFEST_FILE).exists()
    assert PaliGemma.from_pretrained(demo).config.text.depth == 3


VERIFY_BAD = {
    "a chunk's bytes changed (same size)": (lambda d: _swap(_chunk(d)), "does not match its sha256"),
    "a chunk truncated": (lambda d: _cut(_chunk(d)), "the manifest says"),
    "a file removed": (lambda d: (d / "tokenizer.model").unlink(), "tokenizer.model is missing"),
    "a file added": (_write("params/extra.bin", b"x"), "params/extra.bin, which the manifest does not list"),
    "no manifest": (lambda d: (d / MANIFEST_FILE).unlink(), "has no manifest.json"),
    "manifest damaged": (_write(MANIFEST_FILE, b"[]"), "manifest.json is damaged"),
    "manifest entries not objects": LOAD_BAD["manifest entries not objects"],
    "not a directory": (lambda d: (shutil.rmtree(d), d.write_text("x")), "is not a directory"),
}


@pytest.mark.parametrize("case", sorted(VERIFY_BAD))
def test_verify_finds(converted, capsys, case):
    damage, message = VERIFY_BAD[case]
    damage(converted)
    code, out, err = call(verify_main, [converted], capsys)
    assert_one_line_error(code, err, message)


def test_verify_accepts_a_fresh_conversion_and_a_swapped_chunk_still_loads_sizes(converted, capsys):
    code, out, err = call(verify_main, [converted], capsys)
    assert code == 0 and err == "" and out.startswith(f"ok: {converted} (")
    _swap(_chunk(converted))  # same size: loading's stat check passes, only verify's hash sees it
    PaliGemma.from_pretrained(converted)


# == 3. images =================================================================================
BAD_IMAGES = {
    "zero.png": "cannot read image file",
    "text.png": "cannot read image file",
    "truncated.png": "cannot read image file",
    "truncated.jpg": "cannot read image file",
    "header-only.png": "cannot read image file",
    "random.jpg": "cannot read image file",
    "bomb.png": "is 20000x20000 pixels, more than the limit of 100,000,000",
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_load_image_refuses(images, name):
    with pytest.raises(UserError) as info:
        load_image(images[name])
    assert BAD_IMAGES[name] in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("image, message", [
    ("folder.png", "is a directory"),
    ("missing.png", "image file not found"),
    (3, "unsupported image type int"),
    (np.zeros((4, 4, 3), np.float32) + 2, "float image values must lie in [0, 1]"),
    (np.full((4, 4, 3), np.nan, np.float32), "float image values"),
    (np.zeros((4, 4, 2), np.uint8), "image array must have shape"),
    (np.zeros((0, 4, 3), np.uint8), "image array must have shape"),
    (np.zeros((4, 4, 3), np.int64), "dtype must be uint8 or floating"),
])
def test_generate_refuses_images(pg, images, image, message):
    if isinstance(image, str):
        image = images.get(image, images["good"].parent / image)
    with pytest.raises(UserError) as info:
        pg.generate(image, "caption en")
    assert message in str(info.value) and "\n" not in str(info.value)


def _cmyk(d: Path) -> Path:
    PIL.Image.new("CMYK", (5, 3), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    return d / "cmyk.jpg"


def _sixteen_bit(d: Path) -> Path:
    PIL.Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(d / "16bit.png")
    return d / "16bit.png"


def _palette_transparent(d: Path) -> Path:
    image = PIL.Image.new("P", (4, 4), 1)
    image.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    image.save(d / "palette.png", transparency=0)
    return d / "palette.png"


def _animated(d: Path) -> Path:
    frames = [PIL.Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return d / "anim.gif"


def _exif_rotated(d: Path) -> Path:
    image = PIL.Image.new("RGB", (8, 4), (0, 200, 0))
    image.paste((200, 0, 0), (0, 0, 4, 4))  # red left half
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(d / "rotated.jpg", exif=exif, quality=100)
    return d / "rotated.jpg"


def _one_pixel(d: Path) -> Path:
    PIL.Image.new("RGB", (1, 1), (10, 20, 30)).save(d / "1x1.png")
    return d / "1x1.png"


# name: (writer, check of the loaded RGB image)
GOOD_IMAGES = {
    "1x1": (_one_pixel, lambda im: im.size == (1, 1) and im.getpixel((0, 0)) == (10, 20, 30)),
    "CMYK": (_cmyk, lambda im: im.size == (5, 3) and im.getpixel((2, 1))[0] > 200 and im.getpixel((2, 1))[1] < 60),
    "16-bit grayscale (clipped to 255, as transformers)": (_sixteen_bit, lambda im: im.getpixel((0, 0)) == (255, 255, 255)),
    "palette with transparency (alpha dropped, as transformers)": (_palette_transparent,
                                                                    lambda im: im.getpixel((0, 0)) == (200, 0, 0)),
    "animated GIF (first frame)": (_animated, lambda im: im.getpixel((4, 4)) == (255, 0, 0)),
    "EXIF-rotated (orientation applied)": (_exif_rotated,
                                            lambda im: im.size == (4, 8) and im.getpixel((2, 1))[0] > 150),
}


@pytest.mark.parametrize("case", sorted(GOOD_IMAGES))
def test_odd_images_load_right(tmp_path, case):
    write, check = GOOD_IMAGES[case]
    path = write(tmp_path)
    image = load_image(path)
    assert image.mode == "RGB" and check(image), (image.size, image.getpixel((0, 0)))
    pixels = preprocess_images(path, 16)
    assert pixels.shape == (1, 16, 16, 3) and np.isfinite(pixels).all() and np.abs(pixels).max() <= 1


# == 4. prompts and the tokenizer ==============================================================
def test_prompt_too_long_for_the_positions(pg, images):
    with pytest.raises(UserError) as info:
        pg.generate(images["good"], LONG_TEXT, max_new_tokens=8)
    message = str(info.value)
    assert "exceed the model's 8192 positions" in message and "\n" not in message


@pytest.mark.parametrize("prompt", ["<image>", "caption en <image>", "<image><image> what is this?"])
def test_image_token_text_in_a_prompt_is_refused(pg, images, prompt):
    with pytest.raises(UserError, match="contains '<image>'"):
        pg.generate(images["good"], prompt)


@pytest.mark.parametrize("prompt", [None, 3, b"caption en"])
def test_non_string_prompts_are_refused(pg, images, prompt):
    with pytest.raises(UserError):
        pg.generate(images["good"], [prompt])


def test_image_and_prompt_counts_must_match(pg, images):
    with pytest.raises(UserError, match="got 2 images for 3 prompts"):
        pg.generate([images["good"]] * 2, ["a", "b", "c"])
    with pytest.raises(UserError, match="got 0 images for 0 prompts"):
        pg.generate([], [])


def test_loc_tokens_are_tokens_and_eos_is_text(pg):
    """`<loc0001>` is one token (as in transformers); `<eos>` / `<bos>` stay literal text (a
    prompt cannot end itself early); an empty prompt is `<image>`s, `<bos>`, then the newline."""
    tok = pg.tokenizer
    loc = tok.encode("detect <loc0001>")
    assert tok.sp.piece_to_id("<loc0001>") in loc
    ids = tok(["stop <eos> here <bos>"], num_image_tokens=pg.config.num_image_tokens).input_ids[0].tolist()
    assert tok.eos_id not in ids and ids.count(tok.bos_id) == 1
    empty = tok([""], num_image_tokens=pg.config.num_image_tokens).input_ids[0].tolist()
    assert empty == [pg.config.image_token_id] * pg.config.num_image_tokens + [tok.bos_id] + tok.encode("\n")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tokenizer.model").unlink(), "no tokenizer.model"),
    (_write("tokenizer.model", b""), "cannot load tokenizer model"),
    (_write("tokenizer.model", b"\x08\x01random-bytes" * 40), "cannot load tokenizer model"),
])
def test_tokenizer_problems_are_one_line(converted, images, damage, message):
    """A converted directory whose tokenizer is missing or damaged loads (arrays still work) and
    says so at the first text prompt."""
    damage(converted)
    (converted / MANIFEST_FILE).unlink()  # as if written without one; else loading refuses the resized file
    loaded = PaliGemma.from_pretrained(converted)
    with pytest.raises(UserError, match=message):
        loaded.tokenizer
    with pytest.raises(UserError, match=message):
        loaded.generate(images["good"], "caption en")


# == 5. pg.forward with bad arrays =============================================================
@pytest.mark.parametrize("case", ["pixels 3-D", "pixels wrong size", "ids 1-D", "batch mismatch", "no image tokens",
                                  "ids out of vocab", "negative ids"])
def test_forward_refuses_arrays(pg, case):
    c = pg.config
    pixels = np.zeros((1, c.image_size, c.image_size, 3), np.float32)
    ids = np.array([[c.image_token_id] * c.num_image_tokens + [c.bos_token_id, 5]], np.int32)
    if case == "pixels 3-D":
        pixels = pixels[0]
    elif case == "pixels wrong size":
        pixels = np.zeros((1, 8, 8, 3), np.float32)
    elif case == "ids 1-D":
        ids = ids[0]
    elif case == "batch mismatch":
        ids = np.repeat(ids, 2, axis=0)
    elif case == "no image tokens":
        ids = ids[:, c.num_image_tokens:]
    elif case == "ids out of vocab":
        ids[0, -1] = c.vocab_size
    else:
        ids[0, -1] = -1
    with pytest.raises(UserError):
        pg.forward(pixels, ids)


# == 6. run_generate.py ========================================================================
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One persistent compilation cache for the in-process runs that generate (each `main` builds
    a fresh model, whose program would otherwise compile again)."""
    path = tmp_path_factory.mktemp("xla") / "cache"
    return path


@pytest.mark.parametrize("name", sorted(BAD_IMAGES) + ["folder.png"])
def test_run_generate_stops_before_any_output_on_a_bad_image(checkpoint, images, tmp_path, capsys, name):
    draw_dir = tmp_path / "drawings"
    draw_dir.mkdir()
    message = BAD_IMAGES.get(name, "holds no image files")
    args = ["--model", checkpoint["converted"], "--image", images["good"], images[name], "--draw",
            draw_dir / "boxes.png", "--no-compilation-cache"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)
    assert out == "" and listing(draw_dir) == []


@pytest.mark.parametrize("name", ["zero.png", "truncated.png", "bomb.png"])
def test_skip_bad_images_answers_the_good_ones(checkpoint, images, cache_dir, capsys, name):
    args = ["--model", checkpoint["converted"], "--image", images[name], images["good"], "--skip-bad-images",
            "--max-tokens", 3, "--compilation-cache", cache_dir]
    code, out, err = call(generate_main, args, capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 1  # the good image's answer (alone, so without its path)
    assert err.count("warning: skipped") == 1 and BAD_IMAGES[name] in err and "Traceback" not in err


def test_skip_bad_images_with_nothing_left(checkpoint, images, capsys):
    args = ["--model", checkpoint["converted"], "--image", images["zero.png"], "--skip-bad-images",
            "--no-compilation-cache"]
    code, _, err = call(generate_main, args, capsys)
    assert code == 2 and err.endswith("error: no readable image left to answer\n") and "Traceback" not in err


@pytest.mark.parametrize("prompt, message", [
    (LONG_TEXT, "exceed the model's 8192 positions"),
    ("caption <image> en", "contains '<image>'"),
])
def test_run_generate_refuses_prompts(checkpoint, images, capsys, prompt, message):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--prompt", prompt, "--no-compilation-cache"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)
    assert out == ""


@pytest.mark.parametrize("draw, message", [
    ("{tmp}/missing/boxes.png", "does not exist"),
    ("{tmp}/boxes.xyz", "unknown image extension '.xyz'"),
    ("{tmp}", "is a folder"),
])
def test_run_generate_refuses_draw_targets(checkpoint, images, tmp_path, capsys, draw, message):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--draw", draw.format(tmp=tmp_path),
            "--no-compilation-cache"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)
    assert listing(tmp_path) == []


def test_drawings_of_same_named_images_do_not_collide(tmp_path):
    paths = generate_command.draw_paths(str(tmp_path / "out.png"), [Path("a/cat.jpg"), Path("b/cat.jpg"), Path("dog.png")])
    assert [p.name for p in paths] == ["out_cat.png", "out_cat_2.png", "out_dog.png"]
    assert generate_command.draw_paths(str(tmp_path / "one.jpg"), [Path("x.png")]) == [tmp_path / "one.jpg"]


def test_draw_without_boxes_says_so(checkpoint, images, cache_dir, tmp_path, capsys):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--draw", tmp_path / "boxes.png",
            "--max-tokens", 3, "--compilation-cache", cache_dir]
    code, out, err = call(generate_main, args, capsys)
    assert code == 0, err
    assert "no boxes in the answer" in err and not (tmp_path / "boxes.png").exists()


@pytest.mark.parametrize("mode, message", [
    (0o777, "writable by other users"),
    (0o770, "writable by other users"),
])
def test_compilation_cache_writable_by_others_is_refused(checkpoint, images, tmp_path, capsys, mode, message):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--compilation-cache", cache]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)


def test_compilation_cache_is_created_private(tmp_path):
    from pali_jax.generate import enable_compilation_cache

    path = enable_compilation_cache(tmp_path / "new" / "cache")
    assert path.stat().st_mode & 0o777 == 0o700


def test_explicit_compilation_cache_that_cannot_be_made(checkpoint, images, capsys):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--compilation-cache", READ_ONLY / "xla"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, "cannot use the compilation cache directory")


# == 7. fine-tuning ============================================================================
@pytest.fixture(scope="module")
def data(images, tmp_path_factory) -> Path:
    """A folder with a good image and room for data files."""
    d = tmp_path_factory.mktemp("data")
    shutil.copy(images["good"], d / "good.png")
    for name in BAD_IMAGES:
        shutil.copy(images[name], d / name)
    (d / "folder.png").mkdir()
    (d / "sub").mkdir()
    shutil.copy(images["good"], d / "sub" / "inside.png")
    return d


GOOD_LINE = json.dumps({"image": "good.png", "prefix": "caption en", "suffix": "a photo"})


def _line(**fields) -> str:
    return json.dumps({"image": "good.png", "prefix": "caption en", "suffix": "a photo", **fields})


BAD_LINES = {
    "not json": ('{"image": ', "not valid JSON"),
    "a list": ('["good.png", "caption en", "x"]', "expected a JSON object"),
    "a string": ('"good.png"', "expected a JSON object"),
    "missing image": (json.dumps({"prefix": "a", "suffix": "b"}), "missing field 'image'"),
    "missing prefix": (json.dumps({"image": "good.png", "suffix": "b"}), "missing field 'prefix'"),
    "missing suffix": (json.dumps({"image": "good.png", "prefix": "a"}), "missing field 'suffix'"),
    "image a number": (_line(image=3), "field 'image' must be a string"),
    "prefix null": (_line(prefix=None), "field 'prefix' must be a string"),
    "suffix a list": (_line(suffix=["a"]), "field 'suffix' must be a string"),
    "empty suffix": (_line(suffix=""), "field 'suffix' is empty"),
    "blank suffix": (_line(suffix="   "), "field 'suffix' is empty"),
    "<image> in the prefix": (_line(prefix="caption <image>"), "the prefix contains '<image>'"),
    "<image> in the suffix": (_line(suffix="an <image> of a cat"), "the suffix contains '<image>'"),
    "image file missing": (_line(image="nowhere.png"), "image file not found"),
    "image is a folder": (_line(image="folder.png"), "is a directory"),
    "image path escapes with ..": (_line(image="../outside.png"), "leaves the directory of the data file"),
    "image path absolute": (_line(image="/etc/hostname"), "leaves the directory of the data file"),
    **{f"image {name}": (_line(image=name), message) for name, message in BAD_IMAGES.items()},
}


def _data_file(directory: Path, bad_line: str, name: str = "train.jsonl") -> Path:
    path = directory / name
    path.write_text("\n".join([GOOD_LINE, GOOD_LINE, bad_line, GOOD_LINE]) + "\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_finetune_stops_at_a_bad_line(checkpoint, data, tmp_path, capsys, case):
    line, message = BAD_LINES[case]
    train = _data_file(data, line, f"train-{abs(hash(case))}.jsonl")
    out = tmp_path / "run"
    code, stdout, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", out], capsys)
    assert_one_line_error(code, err, f"{train}:3: ")
    assert message in err and not out.exists()


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_skip_bad_lines_skips_each_kind(data, case):
    line, message = BAD_LINES[case]
    train = _data_file(data, line, f"skip-{abs(hash(case))}.jsonl")
    warnings: list[str] = []
    examples = read_jsonl(train, skip_bad=True, warn=warnings.append)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "2", "4"]
    assert len(warnings) == 1 and f"{train}:3: " in warnings[0] and message in warnings[0]


def test_outside_paths_need_the_allow_flag(data):
    train = data / "sub" / "outside.jsonl"
    train.write_text(_line(image="../good.png") + "\n")
    with pytest.raises(UserError, match="--allow-outside-paths"):
        read_jsonl(train)
    [example] = read_jsonl(train, allow_outside=True)
    assert Path(example.image).resolve() == (data / "good.png").resolve()
    inside = data / "inside.jsonl"
    inside.write_text(_line(image="sub/inside.png") + "\n")
    assert len(read_jsonl(inside)) == 1


def test_a_suffix_longer_than_the_positions_names_its_line(checkpoint, data, tmp_path, capsys):
    train = _data_file(data, _line(suffix=LONG_TEXT), "long.jsonl")
    code, _, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", tmp_path / "run"],
                        capsys)
    assert_one_line_error(code, err, f"{train}:3: ")
    assert "exceed the model's positions 8192" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    ("", "holds no usable example"),
    ("\n\n  \n", "holds no usable example"),
    (b"\xff\xfe\x00binary", "cannot read data file"),
    ("folder", "cannot read data file"),
])
def test_finetune_refuses_data_files(checkpoint, tmp_path, capsys, content, message):
    train = tmp_path / "train.jsonl"
    if content == "folder":
        train.mkdir()
    elif isinstance(content, bytes):
        train.write_bytes(content)
    elif content is not None:
        train.write_text(content)
    code, _, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", tmp_path / "run"],
                        capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--lr=-1e-3"], "--lr must be a finite positive number"),
    (["--lr", "0"], "--lr must be a finite positive number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite non-negative number, got nan"),
    (["--weight-decay=-0.1"], "--weight-decay must be a finite non-negative number"),
    (["--momentum", "inf"], "--momentum must be a finite"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite"),
    (["--label-smoothing", "nan"], "--label-smoothing must be a finite"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be below 1"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--max-length", "100000"], "max_length 100000 exceeds the model's 8192 positions"),
    (["--max-length", "0"], "--max-length must be positive"),
    (["--keep", "0"], "--keep must be positive"),
])
def test_finetune_refuses_settings(checkpoint, data, tmp_path, capsys, extra, message):
    train = _data_file(data, GOOD_LINE, "good.jsonl")
    code, _, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", tmp_path / "run",
                                        *extra], capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["out is a file", "out under a read-only folder", "model is the export target"])
def test_finetune_refuses_outputs(checkpoint, data, tmp_path, capsys, case):
    train = _data_file(data, GOOD_LINE, "good.jsonl")
    model = checkpoint["converted"]
    if case == "out is a file":
        out = tmp_path / "run"
        out.write_text("x")
        message = "exists and is not a directory"
    elif case == "out under a read-only folder":
        out, message = READ_ONLY / "pali-jax-run", "Operation not permitted"
    else:  # --out RUN with --model RUN/model: the export would replace the weights being trained
        out = tmp_path / "run"
        shutil.copytree(checkpoint["converted"], out / "model")
        model, message = out / "model", "is or contains the source"
    before = listing(tmp_path)
    code, _, err = call(finetune_main, ["--model", model, "--train", train, "--out", out, "--steps", 2], capsys)
    assert_one_line_error(code, err, message)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("changed, message", [
    (["--lr", "2e-3"], "learning_rate: 0.001 -> 0.002"),
    (["--steps", "40"], "steps: 20 -> 40"),
    (["--lr", "2e-3", "--batch-size", "2"], "batch_size: 4 -> 2; learning_rate: 0.001 -> 0.002"),
])
def test_resume_with_other_settings_is_refused(checkpoint, data, tmp_path, capsys, changed, message):
    train = _data_file(data, GOOD_LINE, "good.jsonl")
    out = tmp_path / "run"
    (out / "checkpoints" / "10").mkdir(parents=True)
    base = ["--model", checkpoint["converted"], "--train", train, "--out", out, "--steps", 20, "--batch-size", 4,
            "--lr", "1e-3"]
    saved = finetune._train_config(finetune.parse_args([str(a) for a in base]))
    import dataclasses
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    before = (out / "train_config.json").read_text()
    code, _, err = call(finetune_main, [*base, *changed, "--resume"], capsys)
    assert_one_line_error(code, err, "--resume with settings that differ from")
    assert message in err and (out / "train_config.json").read_text() == before


# == 8. broken pipes and read-only homes (real processes) ======================================
def test_run_generate_into_a_closed_pipe(checkpoint, images, tmp_path):
    """`run_generate.py ... | head -1`: the reader goes away; no traceback, exit 141 (SIGPIPE's)."""
    script = (f"{sys.executable} {ROOT / 'run_generate.py'} --model {checkpoint['converted']} --image "
              f"{images['good']} {images['good']} --max-tokens 2 --compilation-cache {tmp_path / 'xla'} | head -c 0; "
              "exit ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_read_only_home_warns_once_and_runs(checkpoint, images):
    env = {**os.environ, "HOME": str(READ_ONLY / "nobody")}
    proc = subprocess.run([sys.executable, str(ROOT / "run_generate.py"), "--model", str(checkpoint["converted"]),
                           "--image", str(images["good"]), "--max-tokens", "3"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: cannot use the compilation cache") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.strip() != ""


# == 9. security ===============================================================================
def test_no_pickle_anywhere():
    """Weights come from safetensors and orbax only: no module loads pickles (np.load must say
    allow_pickle=False; no pickle / torch.load / joblib)."""
    offenders = []
    for path in sorted([*ROOT.glob("pali_jax/**/*.py"), *ROOT.glob("convert/*.py"), *ROOT.glob("benchmarks/*.py"),
                        *ROOT.glob("tests/*.py"), ROOT / "run_generate.py"]):
        if path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ("np.load(" in code and "allow_pickle=False" not in code) or "import pickle" in code \
                    or "torch.load(" in code or "joblib" in code or "allow_pickle=True" in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_hub_downloads_fetch_only_what_the_loader_reads(monkeypatch, tmp_path):
    import fnmatch

    import huggingface_hub

    from pali_jax import pretrained

    asked = {}

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        asked["patterns"] = allow_patterns
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(UserError, match="cannot download someone/model"):
        PaliGemma.from_pretrained("someone/model")
    wanted = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
              "tokenizer.model", "tokenizer_config.json"]
    unwanted = ["pytorch_model.bin", "model.pkl", "modeling_paligemma.py", "evil.json", "sub/model.safetensors",
                "flax_model.msgpack", "model.onnx"]
    matches = lambda name: any(fnmatch.fnmatch(name, p) for p in asked["patterns"])  # noqa: E731
    assert asked["patterns"] == pretrained.HUB_PATTERNS
    assert all(matches(n) for n in wanted) and not any(matches(n) for n in unwanted)
