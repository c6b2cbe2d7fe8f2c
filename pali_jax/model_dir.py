"""The converted model directory: `pali_jax_config.json`, `params/` (orbax), tokenizer files, manifest.

Written by the converters and by fine-tuning's export, read by `PaliGemma.from_pretrained`. A
directory is written into a temporary sibling `.NAME.tmp-PID` and renamed at the end: it exists
whole or not at all. A lock file `.NAME.lock` beside it makes two writers of the same destination
fail fast instead of mixing their files, and temporary siblings left by a killed writer (whose PID
is gone) are removed by the next one (`files.clean_stale`).

`manifest.json` lists every file's size and sha256. `check_sizes` (run on every load) compares the
sizes, which costs one `stat` per file; `verify` (`pali-jax verify DIR`) reads and hashes
everything. A directory without a manifest (the bundled demo model, older conversions) still loads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

from pali_jax.checkpoint import save_params
from pali_jax.config import PaliGemmaConfig
from pali_jax.errors import UserError
from pali_jax.files import clean_stale, temporary_sibling
from pali_jax.processor import PaliGemmaTokenizer
from pali_jax.quantize import Quantization, QuantizationError

CONFIG_FILE = "pali_jax_config.json"  # marks a converted directory
QUANTIZATION_KEY = "quantization"  # in CONFIG_FILE, beside the model config: how params/ is quantised
PARAMS_DIR = "params"
MANIFEST_FILE = "manifest.json"
# Besides the weights, what a converted directory carries over from its source.
SIDE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
)


class ModelDirError(UserError):
    """A destination that must not be written, or a model directory that is incomplete or damaged."""


def is_model_dir(path: Path) -> bool:
    """Whether `path` is a converted directory (it holds pali_jax_config.json)."""
    return (path / CONFIG_FILE).exists()


def check_destination(dst: str | Path, source: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Refuses destinations whose replacement would destroy something else: an empty path, the
    current directory or one above it, the source or a directory holding it, and (with
    `overwrite`) an existing directory that is neither empty nor a pali-jax model directory."""
    if not str(dst).strip():
        raise ModelDirError("the output directory is an empty string")
    dst = Path(dst)
    real = dst.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ModelDirError(f"refusing to write {dst}: it is the current directory or one above it")
    if source is not None:
        src = Path(source).resolve()
        if real == src or real in src.parents:
            raise ModelDirError(f"refusing to write {dst}: it is or contains the source {source}")
    if real.exists():
        if not overwrite:
            raise ModelDirError(f"{dst} already exists (pass --overwrite to replace it)")
        if not real.is_dir():
            raise ModelDirError(f"{dst} exists and is not a directory: not replacing it")
        if any(real.iterdir()) and not is_model_dir(real):
            raise ModelDirError(f"refusing to replace {dst}: it is neither empty nor a pali-jax model directory ({CONFIG_FILE})")
    return dst


@contextlib.contextmanager
def _locked(dst: Path) -> Iterator[None]:
    """Holds `.NAME.lock` beside `dst` for the whole write; a second writer fails at once."""
    lock = dst.parent / f".{dst.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ModelDirError(f"cannot write into {dst.parent}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelDirError(f"another process is writing {dst} (lock {lock}): not writing it twice") from None
        # The holder before us may have removed the file after we opened it: then our lock guards nothing.
        if not lock.exists() or os.stat(lock).st_ino != os.fstat(fd).st_ino:
            raise ModelDirError(f"another process is writing {dst} (lock {lock} was replaced): not writing it twice")
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(root: Path) -> None:
    """Writes `manifest.json`: size and sha256 of every other file under `root`."""
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    (root / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def _read_manifest(root: Path) -> dict[str, dict[str, Any]] | None:
    path = root / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    valid = lambda e: (isinstance(e, dict) and isinstance(e.get("sha256"), str)  # noqa: E731
                       and isinstance(e.get("size"), int) and not isinstance(e.get("size"), bool))
    if not isinstance(files, dict) or not all(isinstance(k, str) and valid(e) for k, e in files.items()):
        raise ModelDirError(f"{path} is damaged (not a pali-jax manifest: every file needs its size and sha256)")
    return files


def check_sizes(root: str | Path) -> bool:
    """Checks every file the manifest lists against its recorded size (one stat each). Returns
    False when there is no manifest; raises `ModelDirError` on a missing or resized file."""
    root = Path(root)
    files = _read_manifest(root)
    if files is None:
        return False
    for name, entry in files.items():
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ModelDirError(f"{root} is incomplete: {name} is missing (see pali-jax verify)") from None
        if size != entry.get("size"):
            raise ModelDirError(f"{root} is damaged: {name} has {size} bytes, the manifest says {entry.get('size')}")
    return True


def verify(root: str | Path) -> int:
    """Checks every file against the manifest's size and sha256, and that no file was added.
    Returns the number of files checked; raises `ModelDirError` naming the first mismatch."""
    root = Path(root)
    if not root.is_dir():
        raise ModelDirError(f"{root} is not a directory")
    files = _read_manifest(root)
    if files is None:
        raise ModelDirError(f"{root} has no {MANIFEST_FILE}: nothing to verify against")
    check_sizes(root)
    for name, entry in files.items():
        if _sha256(root / name) != entry.get("sha256"):
            raise ModelDirError(f"{root} is damaged: {name} does not match its sha256 in the manifest")
    extra = sorted(set(p.relative_to(root).as_posix() for p in _files(root)) - set(files))
    if extra:
        raise ModelDirError(f"{root} holds {extra[0]}, which the manifest does not list")
    return len(files)


def read_model_config(root: str | Path) -> PaliGemmaConfig:
    """The config of a converted directory, after checking that the directory is complete: its
    config parses, `params/` exists, and every file has the size the manifest records."""
    root = Path(root)
    path = root / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelDirError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelDirError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    try:
        config = PaliGemmaConfig.from_dict(raw)
    except UserError as e:
        raise ModelDirError(f"{path}: {e}") from None
    if not (root / PARAMS_DIR).is_dir():
        raise ModelDirError(f"{root} has no {PARAMS_DIR}/ directory: the model directory is incomplete")
    check_sizes(root)
    return config


def read_quantization(root: str | Path) -> Quantization | None:
    """How a converted directory's weights are quantised (its config's "quantization" record), or None."""
    path = Path(root) / CONFIG_FILE
    try:
        record = json.loads(path.read_text()).get(QUANTIZATION_KEY)
    except (OSError, ValueError, AttributeError):
        raise ModelDirError(f"cannot read {path}") from None
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ModelDirError(f"{path}: its {QUANTIZATION_KEY!r} record must be a JSON object")
    try:
        return Quantization.from_dict(record)
    except QuantizationError as e:
        raise ModelDirError(f"{path}: {e}") from None


def check_room(parent: Path, host_params: Any) -> None:
    """Refuses a write that cannot fit, before writing anything: the free space of `parent` must
    hold every array (plus 1%), and the process's file size limit (`ulimit -f`) the largest one
    (each array is one file). A write that fails halfway leaves tensorstore finishing abandoned
    writes in the background, so failing up front is also what leaves the least behind."""
    import jax
    import resource

    sizes = [int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(host_params)]
    need, largest = sum(sizes), max(sizes, default=0)
    free = shutil.disk_usage(parent).free
    if need * 1.01 > free:
        raise ModelDirError(f"not enough disk space in {parent}: the parameters need {need / 1e9:.2f} GB, "
                            f"{free / 1e9:.2f} GB are free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and largest > limit:
        raise ModelDirError(f"the file size limit (ulimit -f) is {limit} bytes, and the largest parameter array "
                            f"needs {largest}: raise the limit")


def check_tokenizer(path: Path, config: PaliGemmaConfig, config_source: str = "config.json") -> None:
    """Refuses a tokenizer model a converted directory would carry to fail later (at the first
    prompt): unreadable or not sentencepiece, with ids outside the model's embedding, or with
    special ids other than the config's (`config_source` names where the config came from)."""
    tok = PaliGemmaTokenizer(path, image_token_id=config.image_token_id)
    if tok.vocab_size > config.vocab_size:
        raise ModelDirError(
            f"{path} has {tok.vocab_size} pieces, more than the model's vocabulary of {config.vocab_size}: "
            "it is another model's tokenizer"
        )
    if (tok.bos_id, tok.eos_id) != (config.bos_token_id, config.eos_token_ids[0]):
        raise ModelDirError(
            f"{path} has <bos>/<eos> ids {tok.bos_id}/{tok.eos_id}, {config_source} says "
            f"{config.bos_token_id}/{config.eos_token_ids[0]}: it is another model's tokenizer"
        )


def write_model_dir(
    dst: str | Path,
    config: PaliGemmaConfig,
    host_params: Any,
    source: str | Path | None,
    extra: Mapping[str, Path] | None = None,
    *,
    overwrite: bool = True,
    quant: Quantization | None = None,
) -> Path:
    """Writes `dst` (replacing it whole if it exists and `overwrite`): params in the checkpoint
    layout as host arrays (quantised as `quant` records, if given), the config, the side files
    found in `source`, `extra` files ({name in dst: file}), and the manifest.

    The destination is checked first (`check_destination`). Replacing keeps the old directory
    until the new one is complete: old -> `.NAME.old-PID`, tmp -> NAME, then the old is removed.
    """
    dst = check_destination(dst, source, overwrite=overwrite)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelDirError(f"cannot create {dst.parent}: {e.strerror}") from None
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise ModelDirError(f"cannot write into {dst.parent}: permission denied")
    tmp, old = temporary_sibling(dst), temporary_sibling(dst, "old")
    with _locked(dst):
        clean_stale(dst)
        check_destination(dst, source, overwrite=overwrite)  # again: another writer may have finished meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        check_room(dst.parent, host_params)
        try:
            tmp.mkdir()
            save_params(tmp / PARAMS_DIR, host_params)
            record = config.to_dict() | ({QUANTIZATION_KEY: quant.to_dict()} if quant is not None else {})
            (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))
            for name in SIDE_FILES if source is not None else ():
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, tmp / name)
            for name, file in (extra or {}).items():
                shutil.copy2(file, tmp / name)
            write_manifest(tmp)
            if dst.exists():
                dst.rename(old)
            try:
                tmp.rename(dst)
            except OSError as e:
                if old.exists():
                    old.rename(dst)
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ModelDirError(f"{dst} appeared while it was being written: not mixing two outputs") from None
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return dst
