"""Random transformers PaliGemma models of real widths, for benchmarks (no downloads)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

from pali_jax.config import PaliGemmaConfig as OurConfig


def hf_config(cfg: OurConfig, vision_layers: int | None = None, text_layers: int | None = None) -> PaliGemmaConfig:
    """The transformers config of one of our presets, optionally with fewer layers."""
    v, t = cfg.vision, cfg.text
    vision = SiglipVisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=vision_layers or v.depth,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, vision_use_head=False,
    )
    depth = text_layers or t.depth
    common = dict(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=depth,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
    )
    if t.post_norms:
        text = Gemma2Config(**common, query_pre_attn_scalar=int(t.query_pre_attn_scalar),
                            sliding_window=t.sliding_window, final_logit_softcapping=t.final_logit_softcap,
                            attn_logit_softcapping=t.attn_logit_softcap)
    else:
        text = GemmaConfig(**common)
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
                           projection_dim=t.width, vocab_size=t.vocab_size)


def build(config: PaliGemmaConfig, dtype: torch.dtype) -> PaliGemmaForConditionalGeneration:
    """A random model in `dtype`, eager attention, eval mode, whose greedy answers never end early.

    EOS's row of the (tied) embedding table is zero, so its logit is 0 while the largest of the
    other 257k random logits is far above: every row decodes to max_new_tokens in both
    implementations, and timings compare equal work (a random model otherwise stops rows at
    arbitrary steps, and stops pali-jax's whole batch when all rows have)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.no_grad():
            model = PaliGemmaForConditionalGeneration(config).eval()
            model.get_input_embeddings().weight[config.text_config.eos_token_id or 1] = 0
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("eager")
    return model


def add_checkpoint_arguments(p) -> None:
    """--work, --vision-layers, --text-layers: where and how deep `pg1_checkpoint` builds."""
    p.add_argument("--work", type=Path, help="where the random checkpoint is built and kept (default: a temporary folder)")
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--text-layers", type=int, default=2)


def pg1_checkpoint(args, prefix: str) -> Path:
    """A random PaliGemma 1 3B-widths transformers checkpoint at `args`' depth, saved in bfloat16 (as
    hub checkpoints are) under --work (else a new temporary folder named `prefix`), built once."""
    from pali_jax.config import preset

    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    hf_dir = work / f"pg1-{args.vision_layers}+{args.text_layers}" / "hf"
    if not (hf_dir / "config.json").exists():
        build(hf_config(preset("paligemma-3b-224"), args.vision_layers, args.text_layers), torch.bfloat16).save_pretrained(hf_dir)
    return hf_dir
