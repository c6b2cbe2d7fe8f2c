"""Shared pytest fixtures: the tiny tokenizer and tiny transformers PaliGemma models.

The session runs with HOME in a temporary folder, for every test, xdist worker and subprocess: no
test writes to the real home (the commands' default compilation cache lives there). XLA compiles
with cheap code generation: every program here runs on tiny arrays, and compiling is most of the
suite's time.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

if "PALI_JAX_TEST_HOME" not in os.environ:  # the first process (xdist's controller): its workers inherit it
    os.environ["PALI_JAX_TEST_HOME"] = tempfile.mkdtemp(prefix="pali-jax-test-home-")
    atexit.register(shutil.rmtree, os.environ["PALI_JAX_TEST_HOME"], ignore_errors=True)
os.environ["HOME"] = os.environ["PALI_JAX_TEST_HOME"]
# Optimization level 0, and XLA:CPU's elemental emitters for fused loops instead of its MLIR fusion
# emitters, which cost about as much again to compile at level 0 (40% of a generate or train step's
# compile time on the tiny models).
_CHEAP_CODEGEN = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
if _CHEAP_CODEGEN not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported anywhere
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CHEAP_CODEGEN}".strip()

import PIL.Image
import pytest
import skimage.data
import torch
from transformers import GemmaTokenizer
from transformers import PaliGemmaProcessor as HFPaliGemmaProcessor

import hf_models
from tokenizer_utils import train_tokenizer
from pali_jax.conversion import convert_hf
from pali_jax.pretrained import PaliGemma

# ---- tokenizer fixtures (processor tests) ---------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a tiny Gemma-style ``tokenizer.model`` (see tests/tokenizer_utils.py)."""
    out_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out_dir)
    return out_dir


# ---- end of tokenizer fixtures ---------------------------------------------------------------------


# ---- tiny HF PaliGemma models (model, converter, generation tests) ---------------------------------


KINDS = ("pg1", "pg2", "pg2_narrow")
# How each kind is saved: sharded files for one, a single file for the others.
_SHARDS = {"pg1": None, "pg2": "100KB", "pg2_narrow": None}


@dataclasses.dataclass
class Tiny:
    kind: str
    hf: torch.nn.Module  # the float32 reference, eager attention
    hf_dir: Path  # save_pretrained output
    pg: PaliGemma  # loaded in memory from hf_dir, float32


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    out = {}
    for seed, kind in enumerate(KINDS):
        model = hf_models.build(kind, seed=seed)
        hf_dir = hf_models.save(model, tmp_path_factory.mktemp(kind), shard_size=_SHARDS[kind])
        out[kind] = Tiny(kind, model, hf_dir, PaliGemma.from_pretrained(hf_dir))
    return out


@pytest.fixture(params=KINDS)
def tiny(request, tiny_models) -> Tiny:
    return tiny_models[request.param]


# ---- a tiny PaliGemma 2 with the tiny tokenizer (CLI, API and README tests) ------------------------


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """A tiny PaliGemma 2 whose vocabulary fits the tiny tokenizer: HF dir (with tokenizer.model),
    its conversion, the torch reference and transformers' processor."""
    root = tmp_path_factory.mktemp("cli")
    model = hf_models.build("pg2", seed=3)
    hf_dir = hf_models.save(model, root / "hf")
    shutil.copy(tokenizer_dir / "tokenizer.model", hf_dir / "tokenizer.model")
    converted = convert_hf(hf_dir, root / "converted")
    from test_processor import hf_image_processor

    processor = HFPaliGemmaProcessor(
        image_processor=hf_image_processor(hf_models.IMAGE_SIZE),
        tokenizer=GemmaTokenizer.from_pretrained(str(tokenizer_dir)),
    )
    images = []
    for name in ("astronaut", "coffee"):
        path = root / f"{name}.png"
        PIL.Image.fromarray(getattr(skimage.data, name)()).save(path)
        images.append(path)
    return dict(hf=model, hf_dir=hf_dir, converted=converted, processor=processor, images=images, root=root)


