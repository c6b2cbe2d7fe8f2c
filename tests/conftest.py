"""Shared pytest fixtures."""

from pathlib import Path

import pytest

# ---- tokenizer fixtures (processor tests) ---------------------------------------------------------
from tokenizer_utils import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a tiny Gemma-style ``tokenizer.model`` (see tests/tokenizer_utils.py)."""
    out_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out_dir)
    return out_dir


# ---- end of tokenizer fixtures ---------------------------------------------------------------------


# ---- tiny HF PaliGemma models (model, converter, generation tests) ---------------------------------
import dataclasses

import hf_models
import torch

from convert.hf_to_flax import load_hf
from pali_jax.pretrained import PaliGemma

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
