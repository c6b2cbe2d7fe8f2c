"""Frozen configuration dataclasses for SigLIP, Gemma (v1 and v2) and PaliGemma.

`PaliGemmaConfig.from_hf(path_or_dict)` reads a Hugging Face `config.json`. Real hub configs were
written by transformers 4.4x and omit every field that sat at its class default, so missing fields
take the HF *class* defaults (which are not the values of any real checkpoint: vocab 256000,
SigLIP width 768, ...). Named presets give the real shapes without any file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

from pali_jax.errors import UserError

# HF class defaults, applied to fields a config.json leaves out (transformers' SiglipVisionConfig,
# GemmaConfig, Gemma2Config, PaliGemmaConfig).
_SIGLIP_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    vision_use_head=True, num_channels=3,
)
_GEMMA_DEFAULTS = dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6,
    rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
_GEMMA2_DEFAULTS = dict(
    _GEMMA_DEFAULTS, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256,
    sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
)
_PALIGEMMA_IMAGE_TOKEN_DEFAULT = 256000
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


class ConfigError(UserError):
    """A config.json that pali-jax cannot turn into a model."""


def _check_fields(obj: Any, positive_ints: tuple[str, ...], positive_floats: tuple[str, ...] = (),
                  optional_positive: tuple[str, ...] = ()) -> None:
    """Refuses wrong types and non-positive sizes at construction, so that a bad config.json (or
    pali_jax_config.json) is a one-line error here rather than a shape error deep inside a jit."""
    name = type(obj).__name__
    for field in positive_ints:
        value = getattr(obj, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}.{field} must be a positive integer, got {value!r}")
    for field in positive_floats + optional_positive:
        value = getattr(obj, field)
        if value is None and field in optional_positive:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name}.{field} must be a positive finite number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """The SigLIP vision tower (PaliGemma uses So400m/14 without the attention-pooling head)."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = True

    def __post_init__(self):
        _check_fields(self, ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size"), ("layer_norm_eps",))
        if self.width % self.num_heads:
            raise ConfigError(f"SigLIP width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The Gemma decoder; one class covers Gemma 1 and Gemma 2 through its fields.

    `sliding_window` is the window of the layers flagged in `sliding_layers` (None: no window on
    any layer). HF applies it only to causal (suffix) attention; the bidirectional prefix ignores it.
    """

    vocab_size: int = 257216
    width: int = 2048
    depth: int = 18
    mlp_dim: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    post_norms: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    gelu_approximate: bool = True
    max_positions: int = 8192  # the longest sequence (prompt + generated) the model was made for

    def __post_init__(self):
        _check_fields(
            self, ("vocab_size", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "max_positions"),
            ("query_pre_attn_scalar", "rms_norm_eps", "rope_base"),
            ("attn_logit_softcap", "final_logit_softcap", "sliding_window"),
        )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.sliding_layers and len(self.sliding_layers) != self.depth:
            raise ConfigError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.depth} layers")

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        """One flag per layer: does this layer use the sliding window?"""
        if self.sliding_window is None:
            return (False,) * self.depth
        return self.sliding_layers or (False,) * self.depth


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """PaliGemma: SigLIP -> linear projector -> Gemma, plus the special token ids."""

    vision: SiglipConfig = SiglipConfig()
    text: GemmaConfig = GemmaConfig()
    image_token_id: int = 257152
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    def __post_init__(self):
        if not isinstance(self.vision, SiglipConfig) or not isinstance(self.text, GemmaConfig):
            raise ConfigError("PaliGemmaConfig needs a SiglipConfig and a GemmaConfig")
        ids = {"image_token_id": self.image_token_id, "pad_token_id": self.pad_token_id,
               "bos_token_id": self.bos_token_id}
        if not isinstance(self.eos_token_ids, tuple) or not self.eos_token_ids:
            raise ConfigError(f"eos_token_ids must be a non-empty tuple of ids, got {self.eos_token_ids!r}")
        ids |= {f"eos_token_ids[{i}]": v for i, v in enumerate(self.eos_token_ids)}
        for name, value in ids.items():
            # <image> needs no embedding row (its positions take image features): big_vision's
            # tables end just before it.
            top = self.text.vocab_size + (name == "image_token_id")
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < top:
                raise ConfigError(f"{name} must be a token id in [0, {top}), got {value!r}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    def without_sliding_window(self) -> "PaliGemmaConfig":
        """big_vision's behaviour (how PaliGemma 2 was trained): full attention on every layer."""
        return dataclasses.replace(self, text=dataclasses.replace(self.text, sliding_window=None))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PaliGemmaConfig":
        """The inverse of `to_dict` (a pali_jax_config.json); ConfigError names what is wrong."""
        try:
            for part, kind in (("vision", SiglipConfig), ("text", GemmaConfig)):
                # Every field, explicitly: a missing one must not quietly become a default (another model's size).
                missing = [f.name for f in dataclasses.fields(kind) if f.name not in d[part] and f.name != "sliding_layers"]
                if missing:
                    raise ConfigError(f"missing field {part}.{missing[0]}")
            text = dict(d["text"])
            text["sliding_layers"] = tuple(text.get("sliding_layers", ()))
            return cls(
                vision=SiglipConfig(**d["vision"]),
                text=GemmaConfig(**text),
                image_token_id=d["image_token_id"],
                pad_token_id=d["pad_token_id"],
                bos_token_id=d["bos_token_id"],
                eos_token_ids=tuple(d["eos_token_ids"]),
            )
        except ConfigError:
            raise
        except KeyError as e:
            raise ConfigError(f"missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a list for a dict, an unknown field, ...
            raise ConfigError(" ".join(str(e).split())) from None

    @classmethod
    def from_hf(cls, config: str | Path | Mapping[str, Any]) -> "PaliGemmaConfig":
        """Reads an HF PaliGemma `config.json` (a path, a directory holding one, or its dict)."""
        if isinstance(config, (str, Path)):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"no config.json at {path}") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            except (OSError, UnicodeDecodeError) as e:  # a directory named config.json, unreadable, binary
                raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
            where = f"{path}: "
        else:
            where = ""
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}config.json must hold a JSON object, got {type(config).__name__}")
        try:
            return _from_hf_dict(config)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        except (TypeError, ValueError, AttributeError, KeyError) as e:  # "four" for a size, a list for a dict
            raise ConfigError(f"{where}bad value in config.json ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _from_hf_dict(cfg: Mapping[str, Any]) -> PaliGemmaConfig:
    if cfg.get("model_type", "paligemma") != "paligemma":
        raise ConfigError(f"model_type is {cfg.get('model_type')!r}, expected 'paligemma'")
    v = {**_SIGLIP_DEFAULTS, **cfg.get("vision_config", {})}
    if v["vision_use_head"]:
        raise ConfigError("vision_config.vision_use_head is true: PaliGemma uses no attention-pooling head")
    image_size, patch = _square(v["image_size"], "image_size"), _square(v["patch_size"], "patch_size")
    vision = SiglipConfig(
        width=v["hidden_size"], depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
        num_heads=v["num_attention_heads"], patch_size=patch, image_size=image_size,
        layer_norm_eps=v["layer_norm_eps"], gelu_approximate=_gelu_is_tanh(v["hidden_act"]),
    )

    t_raw = dict(cfg.get("text_config", {}))
    model_type = t_raw.get("model_type", "gemma")
    if model_type not in ("gemma", "gemma2"):
        raise ConfigError(f"text_config.model_type {model_type!r} is not supported (gemma, gemma2)")
    is_v2 = model_type == "gemma2"
    t = {**(_GEMMA2_DEFAULTS if is_v2 else _GEMMA_DEFAULTS), **t_raw}
    rope = t.get("rope_parameters") or {}
    act = t.get("hidden_activation") or t["hidden_act"]
    sliding_window = t.get("sliding_window") if is_v2 else None
    depth = t["num_hidden_layers"]
    if is_v2:
        layer_types = t.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(depth)
        ]
        sliding_layers = tuple(lt == "sliding_attention" for lt in layer_types)
    else:
        sliding_layers = ()
    text = GemmaConfig(
        vocab_size=t["vocab_size"], width=t["hidden_size"], depth=depth,
        mlp_dim=t["intermediate_size"], num_heads=t["num_attention_heads"],
        num_kv_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
        query_pre_attn_scalar=float(t["query_pre_attn_scalar"] if is_v2 else t["head_dim"]),
        attn_logit_softcap=t.get("attn_logit_softcapping") if is_v2 else None,
        final_logit_softcap=t.get("final_logit_softcapping") if is_v2 else None,
        post_norms=is_v2, sliding_window=sliding_window, sliding_layers=sliding_layers,
        rms_norm_eps=t["rms_norm_eps"], rope_base=float(rope.get("rope_theta", t["rope_theta"])),
        gelu_approximate=_gelu_is_tanh(act), max_positions=t["max_position_embeddings"],
    )
    eos = t["eos_token_id"]
    return PaliGemmaConfig(
        vision=vision, text=text,
        image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", _PALIGEMMA_IMAGE_TOKEN_DEFAULT)),
        pad_token_id=t["pad_token_id"] if t["pad_token_id"] is not None else 0,
        bos_token_id=t["bos_token_id"],
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
    )


def _square(value: int | list[int], name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"vision_config.{name} {value} is not square")
        return int(value[0])
    return int(value)


def _gelu_is_tanh(act: str) -> bool:
    if act in _TANH_GELUS:
        return True
    if act == "gelu":
        return False
    raise ConfigError(f"activation {act!r} is not a GELU variant PaliGemma uses")


# -- presets -----------------------------------------------------------------------------------
_HF_VOCAB = 257216
_SO400M = SiglipConfig()
_GEMMA_2B = GemmaConfig()


def _gemma2(width: int, depth: int, mlp: int, heads: int, kv: int, head_dim: int, qpas: float) -> GemmaConfig:
    return GemmaConfig(
        vocab_size=_HF_VOCAB, width=width, depth=depth, mlp_dim=mlp, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, query_pre_attn_scalar=qpas, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        post_norms=True, sliding_window=4096, sliding_layers=tuple(i % 2 == 0 for i in range(depth)),
    )


_TEXT_PRESETS = {
    "paligemma-3b": _GEMMA_2B,
    "paligemma2-3b": _gemma2(2304, 26, 9216, 8, 4, 256, 256),
    "paligemma2-10b": _gemma2(3584, 42, 14336, 16, 8, 256, 256),
    "paligemma2-28b": _gemma2(4608, 46, 36864, 32, 16, 128, 144),
}
PRESETS: dict[str, PaliGemmaConfig] = {
    f"{name}-{res}": PaliGemmaConfig(vision=dataclasses.replace(_SO400M, image_size=res), text=text)
    for name, text in _TEXT_PRESETS.items()
    for res in (224, 448, 896)
}


def preset(name: str) -> PaliGemmaConfig:
    """A named real-checkpoint shape, e.g. `preset("paligemma2-3b-448")`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None

