"""pali-jax: PaliGemma 1 and 2 in JAX/Flax.

    from pali_jax import PaliGemma
    pg = PaliGemma.from_pretrained("google/paligemma2-3b-pt-224")   # or a local directory
    print(pg.generate("cat.jpg", "caption en")[0].text)

The names below are imported when first used, so that `import pali_jax.cli` (the `pali-jax`
command's entry) costs no JAX import: the command installs its Ctrl-C handling before the heavy
imports start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_EXPORTS = {
    "PRESETS": "config", "GemmaConfig": "config", "PaliGemmaConfig": "config", "SiglipConfig": "config",
    "preset": "config",
    "Detection": "detection", "draw_detections": "detection", "parse_detections": "detection",
    "UserError": "errors",
    "GenerateOutput": "decode", "StopReason": "decode", "enable_compilation_cache": "generate",
    "GenerationConfig": "generation_config", "GenerationError": "generation_config",
    "ForwardOutput": "intermediates",
    "PaliGemma": "pretrained", "Result": "pretrained", "Workload": "pretrained",
    "PaliGemmaProcessor": "processor", "PaliGemmaTokenizer": "processor", "load_image": "processor",
    "preprocess_images": "processor",
    "SamplingParams": "sampling",
    "MaskDecoder": "segmentation", "paste_mask": "segmentation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pali_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pali_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from pali_jax.config import PRESETS, GemmaConfig, PaliGemmaConfig, SiglipConfig, preset  # noqa: F401
    from pali_jax.detection import Detection, draw_detections, parse_detections  # noqa: F401
    from pali_jax.errors import UserError  # noqa: F401
    from pali_jax.decode import GenerateOutput, StopReason  # noqa: F401
    from pali_jax.generate import enable_compilation_cache  # noqa: F401
    from pali_jax.generation_config import GenerationConfig, GenerationError  # noqa: F401
    from pali_jax.intermediates import ForwardOutput  # noqa: F401
    from pali_jax.pretrained import PaliGemma, Result, Workload  # noqa: F401
    from pali_jax.processor import PaliGemmaProcessor, PaliGemmaTokenizer, load_image, preprocess_images  # noqa: F401
    from pali_jax.sampling import SamplingParams  # noqa: F401
    from pali_jax.segmentation import MaskDecoder, paste_mask  # noqa: F401
