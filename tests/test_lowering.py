"""Every inference and training program lowers for GPU and TPU (checked here, on CPU, by lowering
for those platforms), in every decoder layout and with either attention kernel."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali_jax.backend import CHECKPOINT_LAYOUT, Layout
from pali_jax.beam_search import BeamSearch
from pali_jax.config import preset
from pali_jax.decode import prepare_prompts
from pali_jax.generate import Generator
from pali_jax.generation_config import GenerationConfig
from pali_jax.paligemma import PaliGemmaModel, to_layout
from pali_jax.sampling import SamplingParams
from pali_jax.train import Trainer, TrainConfig

PLATFORMS = ("cuda", "tpu")


def _tiny(kind: str):
    """A tiny PaliGemma 1 (no soft caps: the kernel dot_product_attention may run) or 2."""
    big = preset("paligemma2-3b-224" if kind == "pg2" else "paligemma-3b-224")
    text = dataclasses.replace(big.text, vocab_size=64, width=16, depth=2, mlp_dim=32, num_heads=2, num_kv_heads=1,
                               head_dim=8, sliding_layers=(True, False) if kind == "pg2" else ())
    vision = dataclasses.replace(big.vision, width=16, depth=1, mlp_dim=16, num_heads=2, patch_size=4, image_size=8)
    cfg = dataclasses.replace(big, text=text, vision=vision, image_token_id=63)
    pixels = np.zeros((2, 8, 8, 3), np.float32)
    ids = np.array([[63] * 4 + [2, 5, 6]] * 2, np.int32)
    params = nn.meta.unbox(PaliGemmaModel(cfg).init(jax.random.PRNGKey(0), pixels, ids)["params"])
    return cfg, params, pixels, ids


@pytest.mark.parametrize("kind, layout, kernel", [
    ("pg1", Layout(True, False), "einsum"),
    ("pg2", Layout(False, False), "einsum"),
    ("pg2", Layout(False, True), "einsum"),
    ("pg1", Layout(False, False), "dot_product_attention"),
])
def test_inference_programs_lower_for_gpu_and_tpu(kind, layout, kernel):
    cfg, params, pixels, ids = _tiny(kind)
    model = PaliGemmaModel(cfg, layout=layout, kernel=kernel)
    params = to_layout(params, CHECKPOINT_LAYOUT, layout)
    statics, ids, types, mask, stops = prepare_prompts(cfg, ids, None, None, GenerationConfig(max_new_tokens=8))
    gen, beams = Generator(model), BeamSearch(model)
    greedy, key = SamplingParams.greedy(), jax.random.PRNGKey(0)
    traced = {
        "generate": gen._generate.trace(statics, params, pixels, ids, types, mask, jnp.int32(8), greedy, key, stops),
        "prefill": gen._prefill.trace(statics, params, pixels, ids, types, mask, greedy, key, stops),
        "beam_search": beams._run.trace(statics, 2, params, pixels, ids, types, mask, jnp.int32(8), stops, 1.0),
        "forward": jax.jit(model.apply).trace({"params": params}, pixels, ids, types, mask),
    }
    for name, program in traced.items():
        for platform in PLATFORMS:
            text = program.lower(lowering_platforms=(platform,)).as_text()
            assert "func.func public @main" in text, (name, platform)


@pytest.mark.parametrize("trainable, lora_rank", [("all", 0), ("lora", 2)])
def test_train_step_lowers_for_gpu_and_tpu(trainable, lora_rank):
    cfg, params, pixels, ids = _tiny("pg2")
    trainer = Trainer(cfg, TrainConfig(trainable=trainable, lora_rank=lora_rank, batch_size=2, frozen_dtype="bfloat16"))
    state = trainer.init_state(params)
    batch = dict(pixel_values=pixels, input_ids=ids, token_type_ids=np.zeros_like(ids),
                 attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids, bool))
    program = Trainer.step.trace(trainer, state, batch)
    for platform in PLATFORMS:
        assert "func.func public @main" in program.lower(lowering_platforms=(platform,)).as_text()
