"""The programs a GPU or TPU process would run, traced here on CPU for that platform
(`backend.Policy(platform)`) and checked for what the policy puts in them: cuDNN's fused attention
on CUDA where it applies, bfloat16 products on bfloat16 weights, none of XLA:CPU's workarounds."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo

from pali_jax import train
from pali_jax.backend import CHECKPOINT_LAYOUT, Policy
from pali_jax.config import preset
from pali_jax.decode import prepare_prompts
from pali_jax.generation_config import GenerationConfig
from pali_jax.paligemma import PaliGemmaModel, to_layout
from pali_jax.pretrained import PaliGemma
from pali_jax.sampling import SamplingParams
from pali_jax.train import Trainer, TrainConfig

CUDNN_ATTENTION = "__cudnn$fmha"  # the custom calls of jax.nn.dot_product_attention(implementation="cudnn")
# backend.project's zero column on XLA:CPU in bf16: x^T [K, M] joined with zeros [K, 1]
ZERO_COLUMN = re.compile(r"stablehlo\.concatenate .*dim = 1 : \(tensor<\d+x\d+xbf16>, tensor<\d+x1xbf16>\)")
DOT_OPERANDS = re.compile(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\)")


def _einsum_attention(dots: list[tuple[str, str]]) -> bool:
    """attention.py's einsum form: its products hold q as [B, T, K, G, H], the only 5-D operand."""
    return any(t.count("x") == 5 for pair in dots for t in pair)


@pytest.fixture(autouse=True)
def host_without_cudnn(monkeypatch):
    """This host has no cuDNN library, and jax asks for its version while tracing the cuDNN path:
    answer for it. Nothing else of that path needs a GPU to trace and lower for CUDA."""
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)


def _tiny(kind: str):
    """A tiny PaliGemma 1 (no soft caps: cuDNN's attention may run) or 2, bfloat16 weights."""
    big = preset("paligemma2-3b-224" if kind == "pg2" else "paligemma-3b-224")
    text = dataclasses.replace(big.text, vocab_size=64, width=16, depth=2, mlp_dim=32, num_heads=2, num_kv_heads=1,
                               head_dim=8, sliding_layers=(True, False) if kind == "pg2" else ())
    vision = dataclasses.replace(big.vision, width=16, depth=1, mlp_dim=16, num_heads=2, patch_size=4, image_size=8)
    cfg = dataclasses.replace(big, text=text, vision=vision, image_token_id=63)
    pixels = np.zeros((2, 8, 8, 3), np.float32)
    ids = np.array([[63] * 4 + [2, 5, 6, 7]] * 2, np.int32)
    params = nn.meta.unbox(PaliGemmaModel(cfg).init(jax.random.PRNGKey(0), pixels, ids)["params"])
    return cfg, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), pixels, ids


def _compiler_options(traced) -> dict:
    return dict(traced._params["compiler_options_kvs"])  # a jit's options travel in its params


def _check_program(text: str, fused_attention: bool, zero_column: bool) -> None:
    dots = DOT_OPERANDS.findall(text)
    assert dots and all(a.endswith("xbf16>") and b.endswith("xbf16>") for a, b in dots), dots
    assert (CUDNN_ATTENTION in text) == fused_attention
    assert _einsum_attention(dots) == (not fused_attention)
    assert bool(ZERO_COLUMN.search(text)) == zero_column


@pytest.mark.parametrize("kind, platform, layout", [
    ("pg1", "cuda", None),
    ("pg2", "cuda", None),
    ("pg1", "tpu", None),
    ("pg1", "cuda", CHECKPOINT_LAYOUT),  # stacked layers under nn.scan
    ("pg1", "cpu", None),  # the CPU program: the checks above do see XLA:CPU's forms
])
def test_inference_programs_are_the_platforms_own(kind, platform, layout):
    """Generation, prefill, beam search and the forward pass, as `PaliGemma` builds them for a
    process on `platform` in bfloat16, lowered for that platform."""
    cfg, params, pixels, ids = _tiny(kind)
    policy = Policy(platform)
    layout = policy.inference_layout(jnp.bfloat16) if layout is None else layout
    pg = PaliGemma(cfg, to_layout(params, CHECKPOINT_LAYOUT, layout), jnp.bfloat16, layout=layout, policy=policy)
    pixels = pixels.astype(jnp.bfloat16)
    statics, ids, types, mask, stops = prepare_prompts(cfg, ids, None, None, GenerationConfig(max_new_tokens=8))
    greedy, key = SamplingParams.greedy(), jax.random.PRNGKey(0)
    traced = {
        "generate": pg.generator._generate.trace(statics, pg.params, pixels, ids, types, mask, jnp.int32(8), greedy, key,
                                                 stops),
        "prefill": pg.generator._prefill.trace(statics, pg.params, pixels, ids, types, mask, greedy, key, stops),
        "beam_search": pg.beam_search._run.trace(statics, 2, pg.params, pixels, ids, types, mask, jnp.int32(8), stops,
                                                 1.0),
        "forward": pg._forward.trace({"params": pg.params}, pixels, ids, types, mask),
    }
    fused = platform == "cuda" and kind == "pg1"
    for name, program in traced.items():
        text = program.lower(lowering_platforms=(platform,)).as_text()
        try:
            # on CPU a pass over 2 rows (a decode step, the prefill's last-position logits) takes the
            # zero column; the forward pass's 40 rows do not
            _check_program(text, fused, zero_column=platform == "cpu" and name != "forward")
            options = _compiler_options(program)
            assert ("xla_disable_hlo_passes" in options) == (platform == "cpu"), options
            assert ("xla_cpu_enable_platform_dependent_math" in options) == (platform == "cpu"), options
        except AssertionError as e:
            raise AssertionError(f"{name} for {platform}: {e}") from e


@pytest.mark.parametrize("kind, trainable, lora_rank, platform", [
    ("pg2", "all", 0, "cuda"),
    ("pg1", "lora", 2, "cuda"),
    ("pg1", "lora", 2, "tpu"),
    ("pg1", "lora", 2, "cpu"),
])
def test_train_step_is_the_platforms_own(kind, trainable, lora_rank, platform):
    """The bfloat16 train step of a process on `platform`: cuDNN's attention forward and backward on
    CUDA for PaliGemma 1, the einsum form under Gemma 2's soft caps."""
    cfg, params, pixels, ids = _tiny(kind)
    train_config = TrainConfig(trainable=trainable, lora_rank=lora_rank, batch_size=2, frozen_dtype="bfloat16")
    trainer = Trainer(cfg, train_config, jnp.bfloat16, policy=Policy(platform))
    state = trainer.init_state(params)
    batch = dict(pixel_values=pixels, input_ids=ids, token_type_ids=np.zeros_like(ids),
                 attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids, bool))
    program = train.programs(trainer.policy).step.trace(trainer, state, batch)
    text = program.lower(lowering_platforms=(platform,)).as_text()
    options = _compiler_options(program)
    assert ("xla_cpu_enable_platform_dependent_math" in options) == (platform == "cpu")
    assert ("xla_disable_hlo_passes" in options) == (platform == "cpu")
    fused = platform == "cuda" and kind == "pg1"
    assert (CUDNN_ATTENTION in text) == fused
    assert ("__cudnn$fmhaScaleBiasSoftmaxBackward" in text) == fused
    # The loss's logits cover the 2 x 4 text positions only (not the image's): the zero column
    # appears exactly where the policy picks it for 8 bf16 rows (on no platform, at present).
    assert bool(ZERO_COLUMN.search(text)) == (Policy(platform).matmul_form(jnp.bfloat16, 8, True) == "left_zero")
