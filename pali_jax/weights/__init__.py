"""Checkpoints -> pali-jax parameter trees: ONE loading framework for every source format.

    config, params = load("path/to/hf_dir", "bfloat16")              # numpy arrays
    config, params = load("paligemma-3b-pt-224.npz", mesh=mesh)       # global arrays on their shards

A format holds only its names and layouts: `hf` (transformers' safetensors, read by
`safetensors_io`), `big_vision` (Google's `.npz`, read by `npz`; also the way back, `save_npz`).
Each turns its tensors into `plan.Piece`s; `plan.make_plan` checks them all against the model
from the headers alone (one dtype rule, every tensor used, every parameter filled, shapes), and
`materialise` reads them, one tensor (or block of rows) at a time, into host arrays or onto a
mesh, refusing NaN and infinity from any source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from pali_jax.config import PaliGemmaConfig
from pali_jax.quantize import Quantization
from pali_jax.weights import big_vision, hf
from pali_jax.weights.materialise import to_host, to_mesh
from pali_jax.weights.plan import DTYPES, Plan, WeightError

__all__ = ["DTYPES", "WeightError", "load", "plan", "to_host", "to_mesh"]


def plan(src: str | os.PathLike, dtype: str | None = None) -> Plan:
    """The checked plan of a checkpoint: a big_vision `.npz` file (its config from its shapes and
    the matching preset; `big_vision.plan` takes a preset) or an HF checkpoint directory."""
    src = Path(src)
    return big_vision.plan(src, dtype) if src.suffix == ".npz" and not src.is_dir() else hf.plan(src, dtype)


def load(
    src: str | os.PathLike, dtype: str | None = None, *, mesh: Mesh | None = None, min_elements: int | None = None,
    quant: Quantization | None = None, per_layer: bool = False,
) -> tuple[PaliGemmaConfig, dict[str, Any]]:
    """(config, nested parameter dict) of a checkpoint (see `plan`): numpy arrays, or global arrays
    split over `mesh` (`sharding.partition_spec`; min_elements as there); with `quant`, its weights
    quantised tensor by tensor as they are read (`pali_jax.quantize`). per_layer: numpy arrays of
    the decoder's layers apart (`llm/layers_{i}`) where the checkpoint's tensors allow it (`to_host`).

    dtype: "float32", "bfloat16", or None / "auto" for the checkpoint's own (float16: float32)."""
    p = plan(src, dtype)
    return p.config, (to_host(p, quant, per_layer) if mesh is None else to_mesh(p, mesh, min_elements, quant))
