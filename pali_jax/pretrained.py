"""`PaliGemma`: a loaded model (config + params) with its compiled entry points.

    pg = PaliGemma.from_pretrained("path/or/hub-id", dtype="float32")
    logits = pg.forward(pixel_values, input_ids, token_type_ids, attention_mask)
    out = pg.generate(pixel_values, input_ids, attention_mask=mask, max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pali_jax.checkpoint import abstract_like, restore_params
from pali_jax.config import PaliGemmaConfig
from pali_jax.errors import UserError
from pali_jax.generate import GenerateOutput, Generator
from pali_jax.paligemma import PaliGemmaModel
from pali_jax.sampling import SamplingParams

CONFIG_FILE = "pali_jax_config.json"  # marks a converted directory (see convert/hf_to_flax.py)
PARAMS_DIR = "params"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a hub download fetches: weights, configs, tokenizer; never the PyTorch .bin duplicates.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


@dataclasses.dataclass
class PaliGemma:
    """A PaliGemma model ready to run. `params` is a nested dict of jax arrays (`img/...`, `llm/...`)."""

    config: PaliGemmaConfig
    params: Any
    dtype: Any = jnp.float32
    path: Path | None = None  # where it was loaded from (tokenizer files live there)

    def __post_init__(self):
        self.module = PaliGemmaModel(self.config, self.dtype)
        self.generator = Generator(self.module)
        self._forward = jax.jit(self.module.apply)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, dtype: str = "float32", *, sliding_window: bool = True
    ) -> "PaliGemma":
        """Loads a converted directory, an HF checkpoint directory (converted in memory) or a hub id.

        dtype: "float32" or "bfloat16" (parameters and activations). sliding_window=False turns
        Gemma 2's sliding window off on every layer (big_vision's behaviour; see README).
        """
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        path = Path(path_or_hub_id).expanduser()
        if not path.exists():
            path = _download(str(path_or_hub_id))
        if (path / CONFIG_FILE).exists():
            config = PaliGemmaConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
            saved = restore_params(path / PARAMS_DIR)  # metadata only would do; orbax needs a target
            params = jax.tree.map(lambda x: jnp.asarray(x, DTYPES[dtype]), saved)
        elif (path / "config.json").exists():
            from convert.hf_to_flax import load_hf

            config, host = load_hf(path, dtype)
            params = jax.tree.map(jnp.asarray, host)
        else:
            raise UserError(f"{path} is neither a pali-jax directory ({CONFIG_FILE}) nor an HF checkpoint (config.json)")
        if not sliding_window:
            config = config.without_sliding_window()
        return cls(config, params, DTYPES[dtype], path)

    # -- model calls ---------------------------------------------------------------------------
    def _check(self, pixel_values, input_ids) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.asarray(pixel_values, np.float32)
        ids = np.asarray(input_ids, np.int32)
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise UserError(f"pixel_values must be [B, {size}, {size}, 3], got {list(pixels.shape)}")
        if ids.ndim != 2 or ids.shape[0] != pixels.shape[0]:
            raise UserError(f"input_ids must be [B, T] with B = {pixels.shape[0]}, got {list(ids.shape)}")
        counts = (ids == self.config.image_token_id).sum(axis=1)
        if (counts != self.config.num_image_tokens).any():
            raise UserError(
                f"every row needs {self.config.num_image_tokens} <image> tokens (id {self.config.image_token_id}); "
                f"got {counts.tolist()}"
            )
        if ids.max() >= self.config.vocab_size or ids.min() < 0:
            raise UserError(f"input_ids must lie in [0, {self.config.vocab_size})")
        return pixels.astype(self.dtype), ids

    def forward(self, pixel_values, input_ids, token_type_ids=None, attention_mask=None) -> jax.Array:
        """Logits [B, T, V] float32. pixel_values [B, H, W, 3] in [-1, 1]; input_ids [B, T] with the
        image tokens in place. token_type_ids None: all prefix; attention_mask None: no padding."""
        pixels, ids = self._check(pixel_values, input_ids)
        return self._forward({"params": self.params}, pixels, ids, token_type_ids, attention_mask)

    def generate_ids(
        self,
        pixel_values,
        input_ids,
        token_type_ids=None,
        attention_mask=None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_tokens: tuple[int, ...] = (),
        cache_length: int | None = None,
    ) -> GenerateOutput:
        """Decodes left-padded prompts given as arrays. Greedy unless temperature > 0.

        Returns token ids [B, n], lengths [B] and why each row stopped.
        """
        pixels, ids = self._check(pixel_values, input_ids)
        sampling = SamplingParams.make(temperature, top_k, top_p)
        return self.generator.generate(
            self.params, pixels, ids, token_type_ids, attention_mask, max_new_tokens=max_new_tokens,
            sampling=sampling, seed=seed, stop_tokens=stop_tokens, cache_length=cache_length,
        )


def _download(hub_id: str) -> Path:
    """Fetches the files a model needs from the Hugging Face hub (or its local cache)."""
    import huggingface_hub
    from huggingface_hub import errors

    if hub_id.count("/") != 1:
        raise UserError(f"{hub_id} is not a local directory, and not a hub id of the form org/name")
    try:
        return Path(huggingface_hub.snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except errors.GatedRepoError:
        raise UserError(
            f"{hub_id} is gated: accept its licence on huggingface.co, then `huggingface-cli login` or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{hub_id} was not found on the hub (or it is private: log in with HF_TOKEN)") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        raise UserError(
            f"cannot download {hub_id} ({type(e).__name__}): no network or HF_HUB_OFFLINE is set, and it is not in "
            "the local hub cache; download it once with network, or pass a local directory"
        ) from None
