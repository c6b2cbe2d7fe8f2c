"""Hugging Face PaliGemma safetensors -> pali-jax parameter trees, one tensor at a time.

Accepts every key layout transformers has written (`language_model.model.*` / `model.language_model.*`,
`vision_tower.vision_model.*` / `vision_tower.*` / `model.vision_tower.*`, `multi_modal_projector.*` /
`model.multi_modal_projector.*`), single files and shards listed in `model.safetensors.index.json`.
`plan` checks the whole checkpoint (every tensor placed, every parameter and layer covered, every
shape right) before any tensor data is read; `load_hf` then reads one tensor at a time into
preallocated stacked arrays, so peak memory is the output plus one tensor. The target tree is the
model's own (`jax.eval_shape` of its init), in the checkpoint layout (`backend.CHECKPOINT_LAYOUT`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pali_jax.config import PaliGemmaConfig
from pali_jax.errors import UserError
from pali_jax.paligemma import abstract_params, nest
from pali_jax.safetensors_io import TensorInfo, read_header, read_into, read_tensor

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class ConversionError(UserError):
    """SRC cannot be converted; the message says which file or tensor and why."""


Transform = Callable[[np.ndarray], np.ndarray]
# A Flax leaf path, the index of the part this tensor fills ((layer,) for stacked leaves, () for
# whole leaves, (layer, ALL, k) for k/v and gate/up, which share one [D, 2, ...] weight), and how
# to turn the PyTorch layout into the Flax one.
Index = tuple[int | slice, ...]
Target = tuple[tuple[str, ...], Index, Transform]
ALL = slice(None)


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear [out, in] -> Flax kernel [in, out]."""
    return w.T


def _heads_in(n: int, h: int) -> Transform:
    """q/k/v projection [n*h, in] -> [in, n, h]."""
    return lambda w: w.T.reshape(-1, n, h)


def _heads_out(n: int, h: int) -> Transform:
    """Output projection [out, n*h] -> [n, h, out]."""
    return lambda w: w.reshape(-1, n, h).transpose(1, 2, 0)



def _split_heads(n: int, h: int) -> Transform:
    """Bias [n*h] -> [n, h]."""
    return lambda b: b.reshape(n, h)


def _canonical(key: str) -> tuple[str, str]:
    """Maps every HF key layout to (tower, rest): tower in {"text", "vision", "projector", "lm_head"}."""
    k = key.removeprefix("model.") if key.startswith("model.") and not key.startswith("model.model.") else key
    if k.startswith("language_model."):
        rest = k.removeprefix("language_model.")
        if rest == "lm_head.weight":
            return "lm_head", rest
        return "text", rest.removeprefix("model.")
    if k.startswith("vision_tower."):
        return "vision", k.removeprefix("vision_tower.").removeprefix("vision_model.")
    if k.startswith("multi_modal_projector."):
        return "projector", k.removeprefix("multi_modal_projector.")
    if k == "lm_head.weight":
        return "lm_head", k
    raise ConversionError(f"unexpected tensor {key!r} (not a PaliGemma weight)")


_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _text_target(rest: str, cfg: PaliGemmaConfig) -> Target | None:
    t = cfg.text
    if rest == "embed_tokens.weight":
        return ("llm", "embedder", "input_embedding"), (), _same
    if rest == "norm.weight":
        return ("llm", "final_norm", "scale"), (), _same
    m = _LAYER.fullmatch(rest)
    if not m or int(m[1]) >= t.depth:
        return None
    i, sub = int(m[1]), m[2]
    norms = {"input_layernorm.weight": "pre_attention_norm"}
    if t.post_norms:  # Gemma 2
        norms |= {
            "post_attention_layernorm.weight": "post_attention_norm",
            "pre_feedforward_layernorm.weight": "pre_ffw_norm",
            "post_feedforward_layernorm.weight": "post_ffw_norm",
        }
    else:  # Gemma 1: HF's "post_attention_layernorm" is the pre-FFW norm
        norms["post_attention_layernorm.weight"] = "pre_ffw_norm"
    table: dict[str, Target] = {
        "self_attn.q_proj.weight": (("attn", "q_einsum"), (i,), _heads_in(t.num_heads, t.head_dim)),
        "self_attn.k_proj.weight": (("attn", "kv_einsum"), (i, ALL, 0), _heads_in(t.num_kv_heads, t.head_dim)),
        "self_attn.v_proj.weight": (("attn", "kv_einsum"), (i, ALL, 1), _heads_in(t.num_kv_heads, t.head_dim)),
        "self_attn.o_proj.weight": (("attn", "attn_vec_einsum"), (i,), _heads_out(t.num_heads, t.head_dim)),
        "mlp.gate_proj.weight": (("mlp", "gating_einsum"), (i, ALL, 0), _linear),
        "mlp.up_proj.weight": (("mlp", "gating_einsum"), (i, ALL, 1), _linear),
        "mlp.down_proj.weight": (("mlp", "linear"), (i,), _linear),
    }
    table |= {k: ((v, "scale"), (i,), _same) for k, v in norms.items()}
    if sub not in table:
        return None
    path, index, fn = table[sub]
    return ("llm", "layers", *path), index, fn


def _vision_target(rest: str, cfg: PaliGemmaConfig) -> Target | None:
    v = cfg.vision
    fixed: dict[str, Target] = {
        "embeddings.patch_embedding.weight": (("embedding", "kernel"), (), lambda w: w.transpose(2, 3, 1, 0)),
        "embeddings.patch_embedding.bias": (("embedding", "bias"), (), _same),
        "embeddings.position_embedding.weight": (("pos_embedding",), (), lambda w: w[None]),
        "post_layernorm.weight": (("Transformer", "encoder_norm", "scale"), (), _same),
        "post_layernorm.bias": (("Transformer", "encoder_norm", "bias"), (), _same),
    }
    if rest in fixed:
        path, index, fn = fixed[rest]
        return ("img", *path), index, fn
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest)
    if not m or int(m[1]) >= v.depth:
        return None
    i, sub = int(m[1]), m[2]
    attn = "MultiHeadDotProductAttention_0"
    table: dict[str, tuple[tuple[str, ...], Transform]] = {
        "layer_norm1.weight": (("LayerNorm_0", "scale"), _same),
        "layer_norm1.bias": (("LayerNorm_0", "bias"), _same),
        "layer_norm2.weight": (("LayerNorm_1", "scale"), _same),
        "layer_norm2.bias": (("LayerNorm_1", "bias"), _same),
        "mlp.fc1.weight": (("Dense_0", "kernel"), _linear),
        "mlp.fc1.bias": (("Dense_0", "bias"), _same),
        "mlp.fc2.weight": (("Dense_1", "kernel"), _linear),
        "mlp.fc2.bias": (("Dense_1", "bias"), _same),
        "self_attn.out_proj.weight": ((attn, "out", "kernel"), _heads_out(v.num_heads, v.head_dim)),
        "self_attn.out_proj.bias": ((attn, "out", "bias"), _same),
    }
    for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        table[f"self_attn.{hf}.weight"] = ((attn, ours, "kernel"), _heads_in(v.num_heads, v.head_dim))
        table[f"self_attn.{hf}.bias"] = ((attn, ours, "bias"), _split_heads(v.num_heads, v.head_dim))
    if sub not in table:
        return None
    path, fn = table[sub]
    return ("img", "Transformer", "encoderblock", *path), (i,), fn


def _target(key: str, cfg: PaliGemmaConfig) -> Target | None:
    """Where an HF tensor goes; None for the tied `lm_head` (it is the embedding)."""
    tower, rest = _canonical(key)
    if tower == "lm_head":
        return None
    if tower == "projector":
        target = {"linear.weight": (("img", "head", "kernel"), (), _linear),
                  "linear.bias": (("img", "head", "bias"), (), _same)}.get(rest)
    elif tower == "text":
        target = _text_target(rest, cfg)
    else:
        target = _vision_target(rest, cfg)
    if target is None:
        raise ConversionError(f"unexpected tensor {key!r} for this config.json (wrong depth or model type?)")
    return target


def checkpoint_tensors(src: Path) -> dict[str, TensorInfo]:
    """Every tensor of an HF checkpoint directory (single file or index + shards)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConversionError(f"{index} is not a valid safetensors index") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).exists()]
        if missing:
            raise ConversionError(f"{src}: shard {missing[0]} listed in model.safetensors.index.json is missing")
    elif (src / "model.safetensors").exists():
        files, weight_map = ["model.safetensors"], None
    else:
        raise ConversionError(f"{src}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        for key, info in read_header(src / name).items():
            if weight_map is not None and weight_map.get(key) != name:
                continue  # the index is authoritative about which shard holds a key
            tensors[key] = info
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ConversionError(f"tensor {absent[0]!r} is listed in the index but not in {weight_map[absent[0]]}")
    return tensors


def _resolve_dtype(dtype: str | None, tensors: dict[str, TensorInfo]) -> np.dtype:
    if dtype in (None, "auto"):
        floats = [i.dtype for i in tensors.values() if np.issubdtype(i.dtype, np.floating) or i.dtype == DTYPES["bfloat16"]]
        return np.dtype(max(set(floats), key=floats.count)) if floats else DTYPES["float32"]
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    return DTYPES[dtype]


LeafPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Placement:
    """One HF tensor and where it goes: the Flax leaf, the slice of it (layer, k/v), the layout change."""

    key: str
    path: LeafPath
    index: Index
    info: TensorInfo
    transform: Transform

    def read(self) -> np.ndarray:
        """The tensor in the Flax layout (in the checkpoint's dtype)."""
        return self.transform(read_tensor(self.info))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked conversion: every HF tensor placed, every Flax leaf (and each of its layers) covered,
    every shape right. Made before any tensor data is read, so a bad checkpoint fails fast."""

    config: PaliGemmaConfig
    dtype: np.dtype
    leaves: dict[LeafPath, jax.ShapeDtypeStruct]  # the model's parameters, flat
    placements: list[Placement]


def plan(src: str | Path, dtype: str | None = None) -> Plan:
    """Checks an HF PaliGemma directory against the model of its config.json; see `Plan`."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory")
    cfg = PaliGemmaConfig.from_hf(src)
    tensors = checkpoint_tensors(src)
    out_dtype = _resolve_dtype(dtype, tensors)
    leaves = {tuple(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    placements, filled = [], {}
    for key in sorted(tensors):
        target = _target(key, cfg)
        if target is None:
            continue
        path, index, fn = target
        leaf = leaves.get(path)
        if leaf is None:
            raise ConversionError(f"tensor {key!r} maps to {'/'.join(path)}, which this config's model lacks")
        info = tensors[key]
        if info.dtype.kind != "f" and info.dtype != DTYPES["bfloat16"]:
            raise ConversionError(f"tensor {key!r} is {info.dtype}: PaliGemma weights are floating point")
        # The layout transforms only reshape and transpose: check the shape they will produce.
        out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(info.shape, jnp.float32)).shape
        ints = [(axis, i) for axis, i in enumerate(index) if isinstance(i, int)]
        part_shape = tuple(n for axis, n in enumerate(leaf.shape) if axis >= len(index) or index[axis] == ALL)
        if out_shape != part_shape or any(i >= leaf.shape[axis] for axis, i in ints):
            raise ConversionError(
                f"tensor {key!r} has shape {info.shape}, which does not fit {'/'.join(path)} "
                f"{leaf.shape} of config.json's model"
            )
        # Which parts of each leaf are filled: one flag per combination of the indexed axes.
        filled.setdefault(path, np.zeros([leaf.shape[axis] for axis, _ in ints], bool))[tuple(i for _, i in ints)] = True
        placements.append(Placement(key, path, index, info, fn))
    for path in leaves:
        if path not in filled or not filled[path].all():
            raise ConversionError(f"the checkpoint has no tensor for {'/'.join(path)} (or for some of its layers)")
    return Plan(cfg, out_dtype, leaves, placements)


def load_hf(src: str | Path, dtype: str | None = None) -> tuple[PaliGemmaConfig, dict[str, Any]]:
    """Reads an HF PaliGemma directory into (config, nested dict of numpy arrays).

    dtype: "float32", "bfloat16", or None/"auto" for the checkpoint's own dtype.
    """
    p = plan(src, dtype)
    arrays = {path: np.empty(leaf.shape, p.dtype) for path, leaf in p.leaves.items()}
    for placement in p.placements:
        out = arrays[placement.path][placement.index]
        if placement.transform is _same and out.flags.c_contiguous:
            read_into(placement.info, out)  # straight into place: no temporary copy
        else:
            out[...] = placement.read()
        check_finite(placement.key, out)
    return p.config, nest(arrays)


def check_finite(key: str, array: np.ndarray) -> None:
    """Refuses a tensor holding NaN or infinity: such a checkpoint would load and give NaN logits."""
    if not np.isfinite(array).all():
        raise ConversionError(f"tensor {key!r} holds NaN or infinite values: the checkpoint is damaged")
