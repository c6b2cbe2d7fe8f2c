"""pali-jax directory -> big_vision PaliGemma `.npz`.

    python -m convert.to_big_vision CONVERTED_DIR OUT.npz [--dtype float32|bfloat16] [--overwrite]

CONVERTED_DIR is what `convert.hf_to_flax`, `convert.big_vision` or fine-tuning's export wrote
(pali_jax_config.json + params/). OUT.npz gets big_vision's names (`params/img/...`,
`params/llm/...`) and layouts, bfloat16 stored as 2-byte void, and the embedding table's first
257152 rows (no `<image>` row, no padding rows; see `pali_jax.weights.big_vision`). Arrays are
written one at a time into a temporary file beside OUT.npz, renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pali_jax.checkpoint import read_params
from pali_jax.config import PaliGemmaConfig
from pali_jax.cli import run_main
from pali_jax.paligemma import abstract_params
from pali_jax.model_dir import CONFIG_FILE, PARAMS_DIR
from pali_jax.weights import WeightError
from pali_jax.weights.big_vision import save_npz


def export(src: str | Path, dst: str | Path, *, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Writes the model of a pali-jax directory as a big_vision `.npz`."""
    src, dst = Path(src), Path(dst)
    if not (src / CONFIG_FILE).is_file():
        raise WeightError(f"{src} is not a pali-jax directory (no {CONFIG_FILE})")
    if dst.exists() and not overwrite:
        raise WeightError(f"{dst} already exists (pass --overwrite to replace it)")
    config = PaliGemmaConfig.from_dict(json.loads((src / CONFIG_FILE).read_text()))
    abstract = abstract_params(config)
    params = read_params(src / PARAMS_DIR, _stored_dtypes(src / PARAMS_DIR, abstract))
    return save_npz(dst, config, params, dtype=dtype)


def _stored_dtypes(params_dir: Path, abstract):
    """`abstract` with each leaf's dtype as stored (so reading maps the files, casting nothing)."""
    import jax
    import ml_dtypes
    import numpy as np

    def stored(keys, leaf):
        meta = params_dir / ".".join(str(k.key) for k in keys) / ".zarray"
        try:
            name = json.loads(meta.read_text())["dtype"]
            dtype = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
        except (OSError, KeyError, TypeError, ValueError):
            dtype = leaf.dtype
        return jax.ShapeDtypeStruct(leaf.shape, dtype)

    return jax.tree_util.tree_map_with_path(stored, abstract)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.to_big_vision", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="pali-jax directory (pali_jax_config.json + params/)")
    parser.add_argument("dst", help="output .npz (written atomically)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: each parameter's stored dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    return run_main(lambda: print(f"wrote {export(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)}"))


if __name__ == "__main__":
    sys.exit(main())
