"""`PaliGemma`'s public methods against arguments of the wrong type or range: each is refused in
one `UserError` line naming what it got, before anything is compiled or run."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from hostile import (  # noqa: F401  (fixtures)
    CONVERT_BAD,
    LOAD_BAD,
    LONG_TEXT,
    ROOT,
    converted,
    images,
    src,
    tiny_pg,
)

from pali_jax import PaliGemma, UserError, preprocess_images
from pali_jax.generation_config import GenerationConfig
from pali_jax.model_dir import MANIFEST_FILE
from pali_jax.pretrained import Workload

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


@pytest.mark.parametrize("case", sorted(LOAD_BAD))
def test_from_pretrained_refuses(converted, case):
    damage, message = LOAD_BAD[case]
    damage(converted)
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(converted)
    assert message in str(info.value) and "\n" not in str(info.value), info.value


@pytest.mark.parametrize("path, message", [
    ("{tmp}/empty", "neither a pali-jax directory"),
    ("{tmp}/a/b/c", "not a local directory, and not a hub id"),
    ("nobody/no-such-model", "cannot download nobody/no-such-model"),
    ("", "neither a pali-jax directory"),
])
def test_from_pretrained_refuses_paths(tmp_path, monkeypatch, path, message):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message):
        PaliGemma.from_pretrained(path.format(tmp=tmp_path))


def test_from_pretrained_refuses_a_bad_dtype(checkpoint):
    with pytest.raises(UserError, match="unknown dtype 'float16'"):
        PaliGemma.from_pretrained(checkpoint["converted"], dtype="float16")


@pytest.mark.parametrize("case", ["NaN weight", "int32 weight", "config heads 'four'", "safetensors truncated to half"])
def test_from_pretrained_of_an_hf_dir_refuses(src, case):
    damage, message = CONVERT_BAD[case]
    damage(src)
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(src)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_demo_model_has_no_manifest_and_loads():
    demo = ROOT / "pali_jax" / "assets" / "demo" / "model"
    assert not (demo / MANIFEST_FILE).exists()
    assert PaliGemma.from_pretrained(demo).config.text.depth == 3


@pytest.mark.parametrize("image, message", [
    ("folder.png", "is a directory"),
    ("missing.png", "image file not found"),
    (3, "unsupported image type int"),
    (np.zeros((4, 4, 3), np.float32) + 2, "float image values must lie in [0, 1]"),
    (np.full((4, 4, 3), np.nan, np.float32), "float image values"),
    (np.zeros((4, 4, 2), np.uint8), "image array must have shape"),
    (np.zeros((0, 4, 3), np.uint8), "image array must have shape"),
    (np.zeros((4, 4, 3), np.int64), "dtype must be uint8 or floating"),
])
def test_generate_refuses_images(tiny_pg, images, image, message):
    if isinstance(image, str):
        image = images.get(image, images["good"].parent / image)
    with pytest.raises(UserError) as info:
        tiny_pg.generate(image, "caption en")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_prompt_too_long_for_the_positions(tiny_pg, images):
    with pytest.raises(UserError) as info:
        tiny_pg.generate(images["good"], LONG_TEXT, max_new_tokens=8)
    message = str(info.value)
    assert "exceed the model's 8192 positions" in message and "\n" not in message


@pytest.mark.parametrize("prompt", ["<image>", "caption en <image>", "<image><image> what is this?"])
def test_image_token_text_in_a_prompt_is_refused(tiny_pg, images, prompt):
    with pytest.raises(UserError, match="contains '<image>'"):
        tiny_pg.generate(images["good"], prompt)


@pytest.mark.parametrize("prompt", [None, 3, b"caption en"])
def test_non_string_prompts_are_refused(tiny_pg, images, prompt):
    with pytest.raises(UserError):
        tiny_pg.generate(images["good"], [prompt])


def test_image_and_prompt_counts_must_match(tiny_pg, images):
    with pytest.raises(UserError, match="got 2 images for 3 prompts"):
        tiny_pg.generate([images["good"]] * 2, ["a", "b", "c"])
    with pytest.raises(UserError, match="got 0 images for 0 prompts"):
        tiny_pg.generate([], [])


@pytest.mark.parametrize("case", ["pixels 3-D", "pixels wrong size", "ids 1-D", "batch mismatch", "no image tokens",
                                  "ids out of vocab", "negative ids"])
def test_forward_refuses_arrays(tiny_pg, case):
    c = tiny_pg.config
    pixels = np.zeros((1, c.image_size, c.image_size, 3), np.float32)
    ids = np.array([[c.image_token_id] * c.num_image_tokens + [c.bos_token_id, 5]], np.int32)
    if case == "pixels 3-D":
        pixels = pixels[0]
    elif case == "pixels wrong size":
        pixels = np.zeros((1, 8, 8, 3), np.float32)
    elif case == "ids 1-D":
        ids = ids[0]
    elif case == "batch mismatch":
        ids = np.repeat(ids, 2, axis=0)
    elif case == "no image tokens":
        ids = ids[:, c.num_image_tokens:]
    elif case == "ids out of vocab":
        ids[0, -1] = c.vocab_size
    else:
        ids[0, -1] = -1
    with pytest.raises(UserError):
        tiny_pg.forward(pixels, ids)


def test_hub_downloads_fetch_only_what_the_loader_reads(monkeypatch, tmp_path):
    import fnmatch

    import huggingface_hub

    from pali_jax import pretrained

    asked = {}

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        asked["patterns"] = allow_patterns
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(UserError, match="cannot download someone/model"):
        PaliGemma.from_pretrained("someone/model")
    wanted = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
              "tokenizer.model", "tokenizer_config.json"]
    unwanted = ["pytorch_model.bin", "model.pkl", "modeling_paligemma.py", "evil.json", "sub/model.safetensors",
                "flax_model.msgpack", "model.onnx"]
    matches = lambda name: any(fnmatch.fnmatch(name, p) for p in asked["patterns"])  # noqa: E731
    assert asked["patterns"] == pretrained.HUB_PATTERNS
    assert all(matches(n) for n in wanted) and not any(matches(n) for n in unwanted)


def test_compile_for_compiles_while_loading_and_generate_reuses_it():
    generation = GenerationConfig(max_new_tokens=6, batch_size=2)
    work = Workload(("caption en",) * 3, generation)
    # bf16 int4: some int4 weights are held one value per byte, which the abstract tree must say
    pg = PaliGemma.from_pretrained(DEMO / "model", dtype="bfloat16", quantize="int4", compile_for=work)
    assert pg.generator.traces == 2  # a batch of two and one of one, traced on the weights' shapes
    found = pg.generate([IMAGE] * 3, "caption en", generation_config=generation)
    assert pg.generator.traces == 2  # generate ran what was compiled
    assert len({r.text for r in found}) == 1 and found[0].text  # the same image and prompt thrice


def test_compile_for_beam_search(caplog):
    generation = GenerationConfig(max_new_tokens=4, beams=2)
    jax.config.update("jax_log_compiles", True)  # for every thread: the compile runs on another one
    try:
        with caplog.at_level(logging.WARNING):
            pg = PaliGemma.from_pretrained(DEMO / "model", compile_for=Workload(("caption en",), generation))
            loading = caplog.text.count("Compiling jit(_run_impl)")
            pg.generate(IMAGE, "caption en", generation_config=generation)
    finally:
        jax.config.update("jax_log_compiles", False)
    assert loading == 1 and caplog.text.count("Compiling jit(_run_impl)") == 1


@pytest.mark.parametrize("prompts, generation, message", [
    (("caption en",), GenerationConfig(return_logits=True), "return_logits needs generate_ids"),
    (("caption en",), GenerationConfig(cache_length=8), "leaves no room"),
    ((LONG_TEXT,), GenerationConfig(max_new_tokens=8), "exceed the model's 8192 positions"),
    ((), GenerationConfig(), "no prompts to compile for"),
])
def test_compile_for_refuses_what_generate_refuses(checkpoint, prompts, generation, message):
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(checkpoint["converted"], compile_for=Workload(prompts, generation))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_compile_for_stream(pg, caplog):
    generation = GenerationConfig(max_new_tokens=5)
    jax.config.update("jax_log_compiles", True)  # for every thread: the compile runs on another one
    try:
        with caplog.at_level(logging.WARNING):
            ahead = PaliGemma.from_pretrained(DEMO / "model", compile_for=Workload(("caption en",), generation, stream=True))
            loading = caplog.text
            caplog.clear()
            pieces = list(ahead.stream(IMAGE, "caption en", generation_config=generation))
    finally:
        jax.config.update("jax_log_compiles", False)
    assert "Compiling jit(_prefill_impl)" in loading and "Compiling jit(_step_impl)" in loading
    assert "_prefill_impl" not in caplog.text and "_step_impl" not in caplog.text  # nothing compiled again
    assert "".join(pieces) == pg.generate(IMAGE, "caption en", max_new_tokens=5)[0].text  # pg: loaded without it


@pytest.mark.parametrize("generation, message", [
    (GenerationConfig(beams=2), "beams is for generate"),
    (GenerationConfig(output_scores=True), "stream decodes greedily or by sampling"),
])
def test_compile_for_stream_refuses_what_stream_refuses(generation, message):
    with pytest.raises(UserError) as info:
        PaliGemma.from_pretrained(DEMO / "model", compile_for=Workload(("caption en",), generation, stream=True))
    assert message in str(info.value) and "\n" not in str(info.value)
