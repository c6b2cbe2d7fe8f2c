"""pali-jax: PaliGemma 1 and 2 in JAX/Flax.

    from pali_jax import PaliGemma
    pg = PaliGemma.from_pretrained("google/paligemma2-3b-pt-224")   # or a local directory
    print(pg.generate("cat.jpg", "caption en")[0].text)
"""

import sys as _sys

# Run as a command (python -m pali_jax.finetune, python -m convert.hf_to_flax, run_generate.py):
# Ctrl-C during the seconds of imports below ends in one line, like Ctrl-C later (`cli.run_main`,
# which puts Python's KeyboardInterrupt back once there is work to clean up). Library users keep
# Python's default.
_ENTRY_POINTS = ("pali_jax.finetune", "pali_jax.annotate", "convert.hf_to_flax", "convert.verify", "run_generate.py")
RUN_AS_COMMAND = any(str(a).endswith(_ENTRY_POINTS) for a in getattr(_sys, "orig_argv", [])[1:3])
if RUN_AS_COMMAND:
    import os as _os
    import signal as _signal

    def _interrupted_early(signum, frame):  # noqa: ARG001
        _os.write(2, b"error: interrupted\n")
        _os._exit(130)

    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _interrupted_early)

from pali_jax.config import PRESETS, GemmaConfig, PaliGemmaConfig, SiglipConfig, preset
from pali_jax.detection import Detection, draw_detections, parse_detections
from pali_jax.errors import UserError
from pali_jax.decode import GenerateOutput, StopReason
from pali_jax.generate import enable_compilation_cache
from pali_jax.generation_config import GenerationConfig, GenerationError
from pali_jax.intermediates import ForwardOutput
from pali_jax.pretrained import PaliGemma, Result
from pali_jax.processor import PaliGemmaProcessor, PaliGemmaTokenizer, load_image, preprocess_images
from pali_jax.sampling import SamplingParams
from pali_jax.segmentation import MaskDecoder, paste_mask

__all__ = [
    "PRESETS", "Detection", "ForwardOutput", "GemmaConfig", "GenerateOutput", "GenerationConfig", "GenerationError", "MaskDecoder",
    "PaliGemma", "PaliGemmaConfig", "PaliGemmaProcessor", "PaliGemmaTokenizer", "Result", "SamplingParams",
    "SiglipConfig", "StopReason", "UserError", "draw_detections", "enable_compilation_cache", "load_image",
    "parse_detections", "paste_mask", "preprocess_images", "preset",
]
