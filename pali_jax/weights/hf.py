"""Hugging Face PaliGemma safetensors -> pali-jax parameter trees, one tensor at a time.

Accepts every key layout transformers has written (`language_model.model.*` / `model.language_model.*`,
`vision_tower.vision_model.*` / `vision_tower.*` / `model.vision_tower.*`, `multi_modal_projector.*` /
`model.multi_modal_projector.*`), single files and shards listed in `model.safetensors.index.json`.
This module holds only the names and layouts (`target`); the checkpoint is checked whole before
any tensor data is read (`weights.plan`) and read one tensor at a time (`weights.materialise`),
as every other source. The target tree is the model's own (`jax.eval_shape` of its init), in the
checkpoint layout (`backend.CHECKPOINT_LAYOUT`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pali_jax.config import PaliGemmaConfig
from pali_jax.weights.plan import ALL, Index, LeafPath, Piece, Plan, Transform, WeightError, make_plan, same
from pali_jax.weights.safetensors_io import TensorInfo, read_header

# A Flax leaf path, the part of it this tensor fills, and how to turn the PyTorch layout into the Flax one.
Target = tuple[LeafPath, Index, Transform]


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
    raise WeightError(f"unexpected tensor {key!r} (not a PaliGemma weight)")


_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _text_target(rest: str, cfg: PaliGemmaConfig) -> Target | None:
    t = cfg.text
    if rest == "embed_tokens.weight":
        return ("llm", "embedder", "input_embedding"), (), same
    if rest == "norm.weight":
        return ("llm", "final_norm", "scale"), (), same
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
    table |= {k: ((v, "scale"), (i,), same) for k, v in norms.items()}
    if sub not in table:
        return None
    path, index, fn = table[sub]
    return ("llm", "layers", *path), index, fn


def _vision_target(rest: str, cfg: PaliGemmaConfig) -> Target | None:
    v = cfg.vision
    fixed: dict[str, Target] = {
        "embeddings.patch_embedding.weight": (("embedding", "kernel"), (), lambda w: w.transpose(2, 3, 1, 0)),
        "embeddings.patch_embedding.bias": (("embedding", "bias"), (), same),
        "embeddings.position_embedding.weight": (("pos_embedding",), (), lambda w: w[None]),
        "post_layernorm.weight": (("Transformer", "encoder_norm", "scale"), (), same),
        "post_layernorm.bias": (("Transformer", "encoder_norm", "bias"), (), same),
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
        "layer_norm1.weight": (("LayerNorm_0", "scale"), same),
        "layer_norm1.bias": (("LayerNorm_0", "bias"), same),
        "layer_norm2.weight": (("LayerNorm_1", "scale"), same),
        "layer_norm2.bias": (("LayerNorm_1", "bias"), same),
        "mlp.fc1.weight": (("Dense_0", "kernel"), _linear),
        "mlp.fc1.bias": (("Dense_0", "bias"), same),
        "mlp.fc2.weight": (("Dense_1", "kernel"), _linear),
        "mlp.fc2.bias": (("Dense_1", "bias"), same),
        "self_attn.out_proj.weight": ((attn, "out", "kernel"), _heads_out(v.num_heads, v.head_dim)),
        "self_attn.out_proj.bias": ((attn, "out", "bias"), same),
    }
    for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        table[f"self_attn.{hf}.weight"] = ((attn, ours, "kernel"), _heads_in(v.num_heads, v.head_dim))
        table[f"self_attn.{hf}.bias"] = ((attn, ours, "bias"), _split_heads(v.num_heads, v.head_dim))
    if sub not in table:
        return None
    path, fn = table[sub]
    return ("img", "Transformer", "encoderblock", *path), (i,), fn


def target(key: str, cfg: PaliGemmaConfig) -> Target | None:
    """Where an HF tensor goes; None for the tied `lm_head` (it is the embedding)."""
    tower, rest = _canonical(key)
    if tower == "lm_head":
        return None
    if tower == "projector":
        found = {"linear.weight": (("img", "head", "kernel"), (), _linear),
                 "linear.bias": (("img", "head", "bias"), (), same)}.get(rest)
    elif tower == "text":
        found = _text_target(rest, cfg)
    else:
        found = _vision_target(rest, cfg)
    if found is None:
        raise WeightError(f"unexpected tensor {key!r} for this config.json (wrong depth or model type?)")
    return found


def checkpoint_tensors(src: Path) -> dict[str, TensorInfo]:
    """Every tensor of an HF checkpoint directory (single file or index + shards)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightError(f"{index} is not a valid safetensors index") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).exists()]
        if missing:
            raise WeightError(f"{src}: shard {missing[0]} listed in model.safetensors.index.json is missing")
    elif (src / "model.safetensors").exists():
        files, weight_map = ["model.safetensors"], None
    else:
        raise WeightError(f"{src}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        for key, info in read_header(src / name).items():
            if weight_map is not None and weight_map.get(key) != name:
                continue  # the index is authoritative about which shard holds a key
            tensors[key] = info
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise WeightError(f"tensor {absent[0]!r} is listed in the index but not in {weight_map[absent[0]]}")
    return tensors


def plan(src: str | Path, dtype: str | None = None) -> Plan:
    """Checks an HF PaliGemma directory against the model of its config.json, from the headers alone.

    dtype: "float32", "bfloat16", or None / "auto" for the checkpoint's own (float16: float32)."""
    src = Path(src)
    if not src.is_dir():
        raise WeightError(f"{src} is not a directory")
    cfg = PaliGemmaConfig.from_hf(src)
    pieces = []
    for key, info in sorted(checkpoint_tensors(src).items()):
        found = target(key, cfg)
        if found is not None:
            path, index, transform = found
            pieces.append(Piece(f"tensor {key!r}", info, path, index, transform, keeps_rows=transform is same))
    return make_plan(cfg, pieces, dtype, "config.json's model")
