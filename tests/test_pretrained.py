"""`PaliGemma`'s public methods against arguments of the wrong type or range: each is refused in
one `UserError` line naming what it got, before anything is compiled or run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pali_jax import PaliGemma, UserError, preprocess_images

DEMO = Path(__file__).resolve().parent.parent / "pali_jax" / "assets" / "demo"
IMAGE = DEMO / "images" / "shapes_0.png"


@pytest.fixture(scope="module")
def pg() -> PaliGemma:
    return PaliGemma.from_pretrained(DEMO / "model")


@pytest.fixture(scope="module")
def arrays(pg):
    pixels = preprocess_images([IMAGE], pg.config.image_size)
    batch = pg.tokenizer(["caption en"], num_image_tokens=pg.config.num_image_tokens)
    return pixels, batch.input_ids, batch.token_type_ids, batch.attention_mask


def _refused(call, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["generate", "stream"])
@pytest.mark.parametrize("prompts, message", [
    (None, "^prompts must be a string or a list of strings, got NoneType$"),
    (5, "^prompts must be a string or a list of strings, got int$"),
    (b"caption en", "^prompts must be a string or a list of strings, got bytes$"),
    (["caption en", 5], r"^prompts\[1\] must be a string, got int$"),
])
def test_prompts_must_be_strings(pg, method, prompts, message):
    _refused(lambda: getattr(pg, method)(str(IMAGE), prompts), message)


@pytest.mark.parametrize("image, message", [
    (5, "^unsupported image type int"),
    (None, "^unsupported image type NoneType"),
    (b"shapes.png", "^unsupported image type bytes"),
])
def test_images_must_be_images(pg, image, message):
    _refused(lambda: pg.generate(image, "caption en"), message)


def test_a_huge_array_image_is_refused_before_it_is_converted(pg):
    long = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (1, 100_000_000, 3))  # a view: no memory held
    _refused(lambda: pg.generate(long, "caption en"), "^the image array is 100000000x1 pixels, a side longer")


@pytest.mark.parametrize("method", ["forward", "generate_ids"])
@pytest.mark.parametrize("case, message", [
    ("pixels None", "^pixel_values must be an array of numbers, got NoneType$"),
    ("pixels text", "^pixel_values must be an array of numbers, got str$"),
    ("pixels empty", r"^pixel_values must be \[B, \d+, \d+, 3\] with B >= 1, got \[0, "),
    ("ids float", "^input_ids must be an array of integers, got an array of float64$"),
    ("ids ragged", "^input_ids must be an array of integers, got list$"),
    ("ids past int32", r"^input_ids must lie in \[0, "),
    ("types shape", r"^token_type_ids must be None or \[B, T\] = \[1, \d+\], got \[1, 3\]$"),
    ("mask values", r"^attention_mask must hold 0 / 1, got 2..2$"),
    ("mask text", "^attention_mask must be an array of integers, got str$"),
])
def test_model_arrays_are_checked(pg, arrays, method, case, message):
    pixels, ids, types, mask = arrays
    if case == "pixels None":
        pixels = None
    elif case == "pixels text":
        pixels = "image.png"
    elif case == "pixels empty":
        pixels = pixels[:0]
    elif case == "ids float":
        ids = ids.astype(np.float64)
    elif case == "ids ragged":
        ids = [ids[0].tolist(), [1, 2]]
    elif case == "ids past int32":
        ids = ids.astype(np.int64)
        ids[0, -1] = 2**32 + 5  # would wrap to 5, inside the vocabulary, if cast first
    elif case == "types shape":
        types = types[:, :3]
    elif case == "mask values":
        mask = mask * 2
    else:
        mask = "all"
    _refused(lambda: getattr(pg, method)(pixels, ids, types, mask), message)
