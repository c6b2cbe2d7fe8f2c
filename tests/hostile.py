"""Hostile inputs shared by the per-module tests: damaged checkpoints and directories, bad
images, prompts and data lines, and the one-line-error assertion every refusal is held to.

Each bad case asserts exit code 2 (commands) or `UserError` (API), exactly one line on stderr
without a traceback, and nothing left behind; the cases that must work assert the right result.
One tiny model serves every case (conftest's `checkpoint`).
"""

from __future__ import annotations

import atexit
import json
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
from safetensors.numpy import load_file, save_file

from pali_jax import cli
from pali_jax.model_dir import MANIFEST_FILE
from pali_jax.pretrained import PaliGemma

ROOT = Path(__file__).resolve().parent.parent


# A path under a regular file: nothing can be created there, even by root (who ignores file modes).
_SCRATCH = Path(tempfile.mkdtemp(prefix="pali-jax-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
(_SCRATCH / "a-file").write_text("not a folder")
READ_ONLY = _SCRATCH / "a-file"


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
def tiny_pg(checkpoint) -> PaliGemma:
    return PaliGemma.from_pretrained(checkpoint["converted"])


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


BAD_IMAGES = {
    "zero.png": "cannot read image file",
    "text.png": "cannot read image file",
    "truncated.png": "cannot read image file",
    "truncated.jpg": "cannot read image file",
    "header-only.png": "cannot read image file",
    "random.jpg": "cannot read image file",
    "bomb.png": "is 20000x20000 pixels, more than the limit of 100,000,000",
}


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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One persistent compilation cache for the in-process runs that generate (each `main` builds
    a fresh model, whose program would otherwise compile again)."""
    path = tmp_path_factory.mktemp("xla") / "cache"
    return path


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


BAD_DATA_LINES = {
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
