"""The converted model directory: `pali_jax_config.json`, `params/` (orbax), tokenizer files.

Written by the converters and by fine-tuning's export, read by `PaliGemma.from_pretrained`. A
directory is written into a temporary sibling and renamed at the end: it exists whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from pali_jax.checkpoint import save_params
from pali_jax.config import PaliGemmaConfig

CONFIG_FILE = "pali_jax_config.json"  # marks a converted directory
PARAMS_DIR = "params"
# Besides the weights, what a converted directory carries over from its source.
SIDE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
)


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).exists()


def write_model_dir(
    dst: str | Path,
    config: PaliGemmaConfig,
    host_params: Any,
    source: str | Path | None,
    extra: Mapping[str, Path] | None = None,
) -> Path:
    """Writes `dst` (replacing it whole if it exists): params in the checkpoint layout as host
    arrays, the config, the side files found in `source`, and `extra` files ({name in dst: file})."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_params(tmp / PARAMS_DIR, host_params)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        for name in SIDE_FILES if source is not None else ():
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, tmp / name)
        for name, file in (extra or {}).items():
            shutil.copy2(file, tmp / name)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
