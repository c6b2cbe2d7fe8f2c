"""big_vision PaliGemma checkpoints (`.npz`) <-> pali-jax parameter trees.

Google publishes PaliGemma's original weights as one flat `.npz` (Kaggle `paligemma-3b-pt-224.npz`,
`paligemma2-3b-pt-224.b16.npz`; big_vision's own `pt_224.npz`): members named by `/`-joined
paths, usually under `params/` (`params/img/...`, `params/llm/...`), bfloat16 stored as 2-byte
numpy `void` (numpy has no bfloat16), float32 or float16 otherwise. Layers are stacked (a leading
[L] axis) or, in some files, one subtree per block (`img/Transformer/encoderblock_0/...`,
`llm/layers/0/...`, as big_vision names unscanned layers): both are read.

What differs from pali-jax's tree (`paligemma.abstract_params`), everything else being identical:

    big_vision                                          pali-jax
    img/Transformer/encoderblock/MlpBlock_0/Dense_k     img/Transformer/encoderblock/Dense_k
    llm/layers/attn/q_einsum/w         [L, N, D, H]     llm/layers/attn/q_einsum        [L, D, N, H]
    llm/layers/attn/kv_einsum/w        [L, 2, K, D, H]  llm/layers/attn/kv_einsum       [L, D, 2, K, H]
    llm/layers/attn/attn_vec_einsum/w  [L, N, H, D]     llm/layers/attn/attn_vec_einsum [L, N, H, D]
    llm/layers/mlp/gating_einsum       [L, 2, D, F]     llm/layers/mlp/gating_einsum    [L, D, 2, F]
    llm/layers/mlp/linear              [L, F, D]        llm/layers/mlp/linear           [L, F, D]
    llm/embedder/input_embedding       [257152, D]      llm/embedder/input_embedding    [V, D]

Vocabulary and `<image>`: big_vision's table has 257152 rows (Gemma's 256000, 1024 `<loc>`, 128
`<seg>`) and no `<image>` row. The config takes vocab_size = the table's rows and image_token_id =
that same number (257152, the id transformers' processor gives `<image>`, so the same tokenizer
and prompts work): image positions are replaced by image features before any table lookup
(`PaliGemmaModel.embed_inputs` looks up id 0 there), so the id needs no row, and the logits cover
exactly big_vision's vocabulary. Writing back (`save_npz`) keeps the table's first
`image_token_id` rows: an HF-derived tree's `<image>` row and padding rows (257152..257215) are
dropped, everything else is written bit for bit.

The config comes from the shapes (widths, depths, heads, kv heads, MLP, patch, image size, post
norms) plus a preset (`pali_jax.config.PRESETS`, given or found by those shapes) for what shapes
cannot tell: the soft caps (Gemma 2: 50 / 30) and the query scale (PaliGemma 2 28B: 1/sqrt(144)
= 1/sqrt(width / heads), not 1/sqrt(head_dim)). big_vision has no sliding window: it is off.
`final_logit_softcap=False` drops Gemma 2's final cap: big_vision's fine-tuning configs set
final_logits_softcap=0.0, so checkpoints fine-tuned there expect no cap (the published pt / mix
checkpoints are the ones HF converted with the cap, which stays the default).

This module holds only the names and layouts: the members are read by `weights.npz`, and checked
and loaded (strictly: every member used, every parameter filled, every shape checked before any
data is read; one member, or a block of its rows, at a time) by `weights.plan` and
`weights.materialise`, as every other source.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pali_jax.config import PRESETS, GemmaConfig, PaliGemmaConfig, SiglipConfig
from pali_jax.files import atomic_write
from pali_jax.weights.npz import Member, read_members
from pali_jax.weights.plan import BFLOAT16, DTYPES, LeafPath, Piece, Plan, WeightError, make_plan, same

_PREFIXES = ("params/",)


# -- names and layouts -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """How one big_vision array fills a pali-jax leaf: the leaf, the layer it fills (None: the whole
    leaf), and the permutation of the big_vision array's axes that gives pali-jax's layout."""

    path: LeafPath
    layer: int | None
    perm: tuple[int, ...] | None  # None: the same layout


# Per-layer permutations big_vision -> pali-jax (a stacked array gets its [L] axis kept in front).
_LLM_LAYOUT: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "attn/q_einsum/w": ("attn/q_einsum", (1, 0, 2)),  # [N, D, H] -> [D, N, H]
    "attn/kv_einsum/w": ("attn/kv_einsum", (2, 0, 1, 3)),  # [2, K, D, H] -> [D, 2, K, H]
    "attn/attn_vec_einsum/w": ("attn/attn_vec_einsum", None),  # [N, H, D]
    "mlp/gating_einsum": ("mlp/gating_einsum", (1, 0, 2)),  # [2, D, F] -> [D, 2, F]
    "mlp/linear": ("mlp/linear", None),
    "pre_attention_norm/scale": ("pre_attention_norm/scale", None),
    "pre_ffw_norm/scale": ("pre_ffw_norm/scale", None),
    "post_attention_norm/scale": ("post_attention_norm/scale", None),
    "post_ffw_norm/scale": ("post_ffw_norm/scale", None),
}
_FIXED = ("img/embedding/kernel", "img/embedding/bias", "img/pos_embedding", "img/head/kernel", "img/head/bias",
          "img/Transformer/encoder_norm/scale", "img/Transformer/encoder_norm/bias",
          "llm/embedder/input_embedding", "llm/final_norm/scale")
_VIT_BLOCK = re.compile(r"img/Transformer/encoderblock(?:_(\d+))?/(.+)")
_LLM_BLOCK = re.compile(r"llm/layers(?:/(\d+)|_(\d+))?/(.+)")


def _stacked(perm: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if perm is None else (0, *(p + 1 for p in perm))


def rule_for(name: str) -> Rule | None:
    """Where a big_vision array goes (None: not a PaliGemma parameter)."""
    if name in _FIXED:
        return Rule(tuple(name.split("/")), None, None)
    if m := _VIT_BLOCK.fullmatch(name):
        layer, rest = m[1], m[2]
        rest = re.sub(r"^MlpBlock_0/(Dense_[01]/(kernel|bias))$", r"\1", rest)
        if not re.fullmatch(r"(LayerNorm_[01]/(scale|bias)|Dense_[01]/(kernel|bias)|"
                            r"MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias))", rest):
            return None
        return Rule(("img", "Transformer", "encoderblock", *rest.split("/")), None if layer is None else int(layer), None)
    if m := _LLM_BLOCK.fullmatch(name):
        layer = m[1] if m[1] is not None else m[2]
        if m[3] not in _LLM_LAYOUT:
            return None
        ours, perm = _LLM_LAYOUT[m[3]]
        path = ("llm", "layers", *ours.split("/"))
        return Rule(path, None, _stacked(perm)) if layer is None else Rule(path, int(layer), perm)
    return None


# -- config from shapes ------------------------------------------------------------------------
def _shape(members: dict[str, Member], *names: str) -> tuple[int, ...]:
    for n in names:
        if n in members:
            return members[n].shape
    raise WeightError(f"{next(iter(members.values())).path}: no {names[0]!r} (not a big_vision PaliGemma checkpoint?)")


def _depth(members: dict[str, Member], pattern: re.Pattern, stacked_name: str, index_groups: tuple[int, ...]) -> int:
    if stacked_name in members:
        return members[stacked_name].shape[0]
    layers = {next(int(m[g]) for g in index_groups if m[g] is not None)
              for n in members if (m := pattern.fullmatch(n)) and any(m[g] is not None for g in index_groups)}
    if not layers:
        raise WeightError(f"{next(iter(members.values())).path}: no {stacked_name!r} and no per-layer arrays")
    if layers != set(range(len(layers))):
        raise WeightError(f"{next(iter(members.values())).path}: layers {sorted(layers)} are not 0..{len(layers) - 1}")
    return len(layers)


def _layer_shape(members: dict[str, Member], suffix: str, stacked: str) -> tuple[int, ...]:
    """The shape of one layer's array `suffix`, from the stacked array or from any layer's own."""
    if stacked in members:
        return members[stacked].shape[1:]
    for name, member in members.items():
        if name.endswith("/" + suffix) and name != stacked:
            return member.shape
    raise WeightError(f"{next(iter(members.values())).path}: no {stacked!r} (not a big_vision PaliGemma checkpoint?)")


def config_from_shapes(
    members: dict[str, Member],
    preset: str | PaliGemmaConfig | None = None,
    *,
    final_logit_softcap: bool = True,
) -> PaliGemmaConfig:
    """The model a checkpoint holds: shapes decide widths and depths; the preset (a name, a config,
    or None: the preset whose shapes match, else Gemma defaults) decides soft caps, query scale,
    norm epsilons and token ids. The sliding window is off (big_vision has none)."""
    if "llm/layers/attn/qkv_einsum/w" in members or any("qkv_einsum" in n for n in members):
        raise WeightError("the checkpoint has a combined qkv_einsum (kv heads = heads, Gemma 7B): not a PaliGemma")
    patch_h, patch_w, channels, v_width = _shape(members, "img/embedding/kernel")
    _, num_patches, _ = _shape(members, "img/pos_embedding")
    side = math.isqrt(num_patches)
    if patch_h != patch_w or channels != 3 or side * side != num_patches:
        raise WeightError(f"img/embedding/kernel {patch_h}x{patch_w}x{channels} or pos_embedding of {num_patches} "
                             "patches is not a square RGB ViT")
    v_depth = _depth(members, _VIT_BLOCK, "img/Transformer/encoderblock/LayerNorm_0/scale", (1,))
    vit = "img/Transformer/encoderblock/"
    _, v_heads, v_head_dim = _layer_shape(members, "MultiHeadDotProductAttention_0/query/kernel",
                                          vit + "MultiHeadDotProductAttention_0/query/kernel")
    _, v_mlp = _layer_shape(members, "MlpBlock_0/Dense_0/kernel", vit + "MlpBlock_0/Dense_0/kernel")
    vocab, width = _shape(members, "llm/embedder/input_embedding")
    depth = _depth(members, _LLM_BLOCK, "llm/layers/pre_attention_norm/scale", (1, 2))
    heads, _, head_dim = _layer_shape(members, "attn/q_einsum/w", "llm/layers/attn/q_einsum/w")
    _, kv_heads, _, _ = _layer_shape(members, "attn/kv_einsum/w", "llm/layers/attn/kv_einsum/w")
    mlp, _ = _layer_shape(members, "mlp/linear", "llm/layers/mlp/linear")
    post_norms = any(n.endswith("post_attention_norm/scale") for n in members)

    vision = SiglipConfig(width=v_width, depth=v_depth, mlp_dim=v_mlp, num_heads=v_heads, patch_size=patch_h,
                          image_size=side * patch_h)
    if vision.head_dim != v_head_dim:
        raise WeightError(f"ViT attention {v_heads} x {v_head_dim} does not split width {v_width}")
    shapes = dict(vocab_size=vocab, width=width, depth=depth, mlp_dim=mlp, num_heads=heads, num_kv_heads=kv_heads,
                  head_dim=head_dim, post_norms=post_norms)
    base = _base_config(preset, vision, shapes)
    text = dataclasses.replace(
        base.text, **shapes, sliding_window=None, sliding_layers=(),
        final_logit_softcap=base.text.final_logit_softcap if final_logit_softcap else None,
    )
    if not post_norms and preset is None:  # Gemma 1: no caps, query scale 1/sqrt(head_dim)
        text = dataclasses.replace(text, attn_logit_softcap=None, final_logit_softcap=None,
                                   query_pre_attn_scalar=float(head_dim))
    # <image> right after the table (see the module docstring); it needs no row.
    return dataclasses.replace(base, vision=dataclasses.replace(base.vision, **dataclasses.asdict(vision)),
                               text=text, image_token_id=vocab)


def _text_shapes(t: GemmaConfig) -> dict[str, Any]:
    return dict(width=t.width, depth=t.depth, mlp_dim=t.mlp_dim, num_heads=t.num_heads,
                num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, post_norms=t.post_norms)


def _base_config(preset: str | PaliGemmaConfig | None, vision: SiglipConfig, shapes: dict) -> PaliGemmaConfig:
    wanted = {k: v for k, v in shapes.items() if k != "vocab_size"}
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise WeightError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[preset]
    if isinstance(preset, PaliGemmaConfig):
        got = _text_shapes(preset.text)
        diff = [f"{k} {got[k]} (checkpoint: {wanted[k]})" for k in wanted if got[k] != wanted[k]]
        if preset.vision.width != vision.width or preset.vision.depth != vision.depth:
            diff.append(f"vision {preset.vision.width}x{preset.vision.depth} (checkpoint: {vision.width}x{vision.depth})")
        if diff:
            raise WeightError(f"the checkpoint does not have the preset's shapes: {'; '.join(diff)}")
        return preset
    for cfg in PRESETS.values():  # the published shapes: take the matching preset's caps and query scale
        if _text_shapes(cfg.text) == wanted and cfg.vision.width == vision.width:
            return cfg
    if shapes["post_norms"]:  # an unknown Gemma 2: its usual caps, query scale 1/sqrt(head_dim)
        return PaliGemmaConfig(text=GemmaConfig(attn_logit_softcap=50.0, final_logit_softcap=30.0,
                                                query_pre_attn_scalar=float(shapes["head_dim"]), post_norms=True))
    return PaliGemmaConfig()


# -- reading -----------------------------------------------------------------------------------
def _piece(member: Member, rule: Rule) -> Piece:
    keeps_rows = rule.perm is None or rule.perm[0] == 0
    transform = same if rule.perm is None else (lambda a, perm=rule.perm: a.transpose(perm))
    index = () if rule.layer is None else (rule.layer,)
    return Piece(f"{member.path}: {member.name!r}", member, rule.path, index, transform, keeps_rows)


def plan(
    src: str | os.PathLike,
    dtype: str | None = None,
    preset: str | PaliGemmaConfig | None = None,
    *,
    final_logit_softcap: bool = True,
) -> Plan:
    """Checks a big_vision `.npz` against the model its shapes describe, from the headers alone.

    dtype: "float32", "bfloat16", or None / "auto" for the file's own (float16 files: float32).
    preset: what shapes cannot tell (see `config_from_shapes`); final_logit_softcap=False for
    checkpoints fine-tuned with big_vision's configs (final_logits_softcap=0.0)."""
    members = read_members(src, _PREFIXES)
    cfg = config_from_shapes(members, preset, final_logit_softcap=final_logit_softcap)
    pieces = []
    for name in sorted(members):
        rule = rule_for(name)
        if rule is None:
            raise WeightError(f"{src}: unexpected array {name!r} (not a parameter of this PaliGemma)")
        pieces.append(_piece(members[name], rule))
    return make_plan(cfg, pieces, dtype, "the model its shapes describe")


# -- writing -----------------------------------------------------------------------------------
def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


_OURS_TO_BV_LLM = {ours: (bv, perm) for bv, (ours, perm) in _LLM_LAYOUT.items()}


def big_vision_arrays(config: PaliGemmaConfig, params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(big_vision name, array in big_vision's layout) for every parameter of a stacked pali-jax
    tree, lazily: each is a view or a transpose of the leaf (numpy), nothing copied up front."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for keys, leaf in flat:
        path = "/".join(str(k.key) for k in keys)
        arr = leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf)
        if path.startswith("llm/layers_"):
            raise WeightError("the tree holds split decoder layers (llm/layers_0/...): save the stacked tree")
        if path == "llm/embedder/input_embedding":
            rows = min(arr.shape[0], config.image_token_id)  # no <image> row, no padding rows
            yield path, arr[:rows]
        elif path.startswith("llm/layers/"):
            rest = path[len("llm/layers/"):]
            if rest not in _OURS_TO_BV_LLM:
                raise WeightError(f"unexpected parameter {path}")
            bv, perm = _OURS_TO_BV_LLM[rest]
            yield f"llm/layers/{bv}", arr if perm is None else arr.transpose(_inverse(_stacked(perm)))
        elif m := re.fullmatch(r"img/Transformer/encoderblock/(Dense_[01]/(kernel|bias))", path):
            yield f"img/Transformer/encoderblock/MlpBlock_0/{m[1]}", arr
        else:
            yield path, arr


def save_npz(
    dst: str | os.PathLike,
    config: PaliGemmaConfig,
    params: Any,
    *,
    dtype: str | None = None,
    prefix: str = "params/",
) -> Path:
    """Writes a stacked pali-jax tree as big_vision's `.npz` (`params/...` names, big_vision
    layouts, bfloat16 as 2-byte void), one array at a time, atomically (a temporary file beside
    `dst`, renamed at the end). dtype: None keeps each leaf's, else "float32" / "bfloat16"."""
    dst = Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise WeightError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in big_vision_arrays(config, params):
            if dtype is not None and arr.dtype != DTYPES[dtype]:
                arr = arr.astype(np.dtype(DTYPES[dtype]))
            if arr.dtype == BFLOAT16:
                arr = arr.view(np.dtype("V2"))  # what big_vision's np.savez writes for bfloat16
            with zf.open(f"{prefix}{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)  # non-contiguous: written in chunks
    return dst
