"""Tiny random PaliGemma checkpoints built with transformers: the reference for every parity test."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

# The tiny tokenizer of tests/tokenizer_utils.py has fewer pieces than this; `<image>` sits right
# after the sentencepiece vocabulary as in HF's processor, and the embedding has spare rows as the
# real checkpoints do.
VOCAB_SIZE = 2112
IMAGE_TOKEN_ID = 2000  # = the tiny tokenizer's sentencepiece vocabulary size (tests/tokenizer_utils.py)
IMAGE_SIZE, PATCH = 16, 4  # 16 image tokens


def _vision(width=32, depth=2, heads=4, mlp=56):
    return SiglipVisionConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads,
        image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False,
    )


def tiny_config(kind: str, image_token_id: int = IMAGE_TOKEN_ID) -> PaliGemmaConfig:
    """kind: "pg1" (Gemma 1, MQA), "pg2" (Gemma 2: GQA, soft caps, query_pre_attn_scalar !=
    head_dim, a sliding window shorter than test sequences) or "pg2_narrow" (heads * head_dim != width)."""
    common = dict(vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6, initializer_range=0.1, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if kind == "pg1":
        text = GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, **common)
    elif kind == "pg2":
        text = Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **common)
    elif kind == "pg2_narrow":
        text = Gemma2Config(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            attn_logit_softcapping=5.0, final_logit_softcapping=4.0, **common)
    else:
        raise ValueError(kind)
    return PaliGemmaConfig(
        vision_config=_vision(), text_config=text, image_token_index=image_token_id,
        projection_dim=text.hidden_size, vocab_size=VOCAB_SIZE,
    )


def build(kind: str, image_token_id: int = IMAGE_TOKEN_ID, seed: int = 0) -> PaliGemmaForConditionalGeneration:
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(tiny_config(kind, image_token_id)).eval()
    model.set_attn_implementation("eager")
    # Random init leaves norm weights and biases at zero: perturb every tensor so that a swapped or
    # dropped weight cannot hide. Larger decoder norm scales let the layers outweigh the scaled
    # token embedding in the residual stream; otherwise a random model just repeats its input token
    # and greedy decoding tests nothing.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if "language_model" in name and "layernorm" in name and "layers." in name:
                p.add_(3.0)
    return model


def save(model, out_dir: Path, *, shard_size: str | None = None, dtype: torch.dtype | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    m = model.to(dtype) if dtype is not None else model
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    m.save_pretrained(out_dir, **kwargs)
    if dtype is not None:
        model.to(torch.float32)
    return out_dir
