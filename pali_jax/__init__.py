"""pali-jax: PaliGemma 1 and 2 in JAX/Flax.

    from pali_jax import PaliGemma
    pg = PaliGemma.from_pretrained("google/paligemma2-3b-pt-224")   # or a local directory
    print(pg.generate("cat.jpg", "caption en")[0].text)
"""

from pali_jax.config import PRESETS, GemmaConfig, PaliGemmaConfig, SiglipConfig, preset
from pali_jax.detection import Detection, draw_detections, parse_detections
from pali_jax.errors import UserError
from pali_jax.generate import GenerateOutput, StopReason, enable_compilation_cache
from pali_jax.generation_config import GenerationConfig, GenerationError
from pali_jax.pretrained import PaliGemma, Result
from pali_jax.processor import PaliGemmaProcessor, PaliGemmaTokenizer, load_image, preprocess_images
from pali_jax.sampling import SamplingParams
from pali_jax.segmentation import MaskDecoder, paste_mask

__all__ = [
    "PRESETS", "Detection", "GemmaConfig", "GenerateOutput", "GenerationConfig", "GenerationError", "MaskDecoder",
    "PaliGemma", "PaliGemmaConfig", "PaliGemmaProcessor", "PaliGemmaTokenizer", "Result", "SamplingParams",
    "SiglipConfig", "StopReason", "UserError", "draw_detections", "enable_compilation_cache", "load_image",
    "parse_detections", "paste_mask", "preprocess_images", "preset",
]
