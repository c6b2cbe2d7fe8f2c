"""Tests for pali_jax.processor and pali_jax.detection, with transformers' PaliGemmaProcessor as reference."""

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import sentencepiece as spm
import skimage.data
from hostile import BAD_IMAGES, GOOD_IMAGES, _write, converted, images, tiny_pg  # noqa: F401  (fixtures)
from tokenizer_utils import LOC_TOKENS, SEG_TOKENS
from transformers import GemmaTokenizer
from transformers import PaliGemmaProcessor as HFPaliGemmaProcessor
from transformers.models.siglip.image_processing_pil_siglip import (
    SiglipImageProcessorPil,
)

from pali_jax import processor
from pali_jax.detection import Detection, draw_detections, parse_detections
from pali_jax.errors import UserError
from pali_jax.model_dir import MANIFEST_FILE
from pali_jax.pretrained import PaliGemma
from pali_jax.processor import (
    PaliGemmaProcessor,
    PaliGemmaTokenizer,
    ProcessorError,
    image_list,
    load_image,
    preprocess_images,
)

NUM_IMAGE_TOKENS = 16
SIZE = 224
TOL = 1e-6


# ---- references ----------------------------------------------------------------------------------


def hf_image_processor(size: int) -> SiglipImageProcessorPil:
    # transformers 5 ships two SigLIP image processors: SiglipImageProcessor is the torchvision
    # backend, SiglipImageProcessorPil the PIL one (AutoImageProcessor(..., backend="pil")).
    processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    processor.image_seq_length = NUM_IMAGE_TOKENS
    return processor


def hf_pixels(images, size: int = SIZE, **kwargs) -> np.ndarray:
    out = hf_image_processor(size)(images, return_tensors="np", **kwargs)["pixel_values"]
    return out.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def hf_processor(tokenizer_dir: Path) -> HFPaliGemmaProcessor:
    tokenizer = GemmaTokenizer.from_pretrained(str(tokenizer_dir))
    return HFPaliGemmaProcessor(image_processor=hf_image_processor(SIZE), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> PaliGemmaTokenizer:
    return PaliGemmaTokenizer(tokenizer_dir)


def hf_encode(hf_processor, prefixes, suffixes=None, **kwargs) -> dict[str, np.ndarray]:
    images = [PIL.Image.new("RGB", (4, 4))] * len(prefixes)
    out = hf_processor(text=list(prefixes), images=images, suffix=suffixes, return_tensors="np", **kwargs)
    return {k: np.asarray(out[k]) for k in ("input_ids", "token_type_ids", "attention_mask", "labels")}


# ---- images ---------------------------------------------------------------------------------------

_rng = np.random.default_rng(0)
_noise = _rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)


def _pil_cases() -> dict[str, PIL.Image.Image]:
    rgb = PIL.Image.fromarray(_noise[..., :3])
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 7
    return {
        "astronaut": PIL.Image.fromarray(skimage.data.astronaut()),
        "chelsea": PIL.Image.fromarray(skimage.data.chelsea()),
        "coffee": PIL.Image.fromarray(skimage.data.coffee()),
        "camera_L": PIL.Image.fromarray(skimage.data.camera()),
        "non_square": rgb,
        "one_pixel": PIL.Image.fromarray(_noise[:1, :1, :3]),
        "tall_strip": PIL.Image.fromarray(_noise[:, :2, :3]),
        "RGBA": PIL.Image.fromarray(_noise),
        "LA": PIL.Image.fromarray(_noise).convert("LA"),
        "PA": PIL.Image.fromarray(_noise).convert("PA"),
        "P": rgb.convert("P"),
        "P_transparency": palette_transparent,
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I": PIL.Image.fromarray(_rng.integers(-500, 70000, (37, 53)).astype(np.int32)),
        "F": PIL.Image.fromarray(_rng.normal(100, 150, (37, 53)).astype(np.float32)),
        "I;16": PIL.Image.fromarray(_rng.integers(0, 400, (37, 53)).astype(np.uint16)),
    }


@pytest.mark.parametrize("name", list(_pil_cases()))
def test_pil_images_match_hf(name):
    image = _pil_cases()[name]
    np.testing.assert_allclose(preprocess_images([image], SIZE), hf_pixels([image]), rtol=0, atol=TOL)


def test_batch_of_mixed_images_matches_hf():
    images = list(_pil_cases().values())
    ours = preprocess_images(images, 64)
    assert ours.shape == (len(images), 64, 64, 3) and ours.dtype == np.float32
    assert np.abs(ours - hf_pixels(images, 64)).max() <= TOL


def test_large_image_matches_hf():
    # 6000x4000 photo-like content: the astronaut tiled, plus noise so the resize filter matters.
    tiled = np.tile(skimage.data.astronaut(), (8, 12, 1))[:4000, :6000]
    large = PIL.Image.fromarray(tiled ^ _rng.integers(0, 32, tiled.shape, dtype=np.uint8))
    assert large.size == (6000, 4000)
    assert np.abs(preprocess_images(large, SIZE) - hf_pixels([large])).max() <= TOL


def test_16_bit_png_file_matches_hf(tmp_path):
    # Values above 255: transformers (via PIL's convert) clips them rather than rescaling.
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(_rng.integers(0, 65536, (30, 40)).astype(np.uint16)).save(path)
    with PIL.Image.open(path) as image:
        assert image.mode == "I;16"
        np.testing.assert_allclose(preprocess_images(image, SIZE), hf_pixels([image]), rtol=0, atol=TOL)
    np.testing.assert_allclose(preprocess_images(path, SIZE), hf_pixels([str(path)]), rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "array",
    [
        _noise[..., :3],
        _noise[..., :1],
        _noise,  # RGBA: composited onto white
        _noise[..., :3].astype(np.float32) / 255,
        _noise.astype(np.float64) / 255,
        _rng.random((20, 30, 3)).astype(np.float32),
    ],
    ids=["uint8_rgb", "uint8_gray", "uint8_rgba", "float32_rgb", "float64_rgba", "float32_random"],
)
def test_arrays_match_hf(array):
    # transformers guesses the channel axis of arrays (and treats floats as already rescaled only
    # with do_rescale=False), so tell it both.
    kwargs = {"input_data_format": "channels_last"}
    if array.dtype != np.uint8:
        kwargs["do_rescale"] = False
    np.testing.assert_allclose(preprocess_images(array, SIZE), hf_pixels([array], **kwargs), rtol=0, atol=TOL)


def test_array_forms_agree():
    gray = _noise[..., 0]
    expected = preprocess_images(PIL.Image.fromarray(gray), 32)
    assert np.array_equal(preprocess_images(gray, 32), expected)
    assert np.array_equal(preprocess_images(gray[..., None], 32), expected)
    batch = np.stack([_noise[..., :3]] * 2)
    assert np.array_equal(preprocess_images(batch, 32), preprocess_images([batch[0], batch[1]], 32))
    assert np.array_equal(
        preprocess_images(_noise[..., :3].astype(np.float32) / 255, 32), preprocess_images(_noise[..., :3], 32)
    )


def test_paths_match_hf_and_apply_exif(tmp_path):
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to display upright.
    stored = skimage.data.chelsea()[:200, :300]  # 300 wide, 200 high as stored
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    jpeg = tmp_path / "rotated.jpg"
    PIL.Image.fromarray(stored).save(jpeg, exif=exif, quality=95)
    rgba_png = tmp_path / "alpha.png"
    PIL.Image.fromarray(_noise).save(rgba_png)

    for path in (jpeg, rgba_png):
        for as_str in (True, False):
            ours = preprocess_images(str(path) if as_str else path, SIZE)
            assert np.abs(ours - hf_pixels([str(path)])).max() <= TOL

    # From a path the EXIF rotation is applied; an already opened PIL image is used as stored,
    # as transformers does.
    with PIL.Image.open(jpeg) as image:
        unrotated = preprocess_images(image, SIZE)
        upright = preprocess_images(image.transpose(PIL.Image.Transpose.ROTATE_270), SIZE)
        np.testing.assert_allclose(unrotated, hf_pixels([image]), rtol=0, atol=TOL)
    assert np.array_equal(preprocess_images(jpeg, SIZE), upright)
    assert not np.allclose(unrotated, upright, atol=0.1)

    # transformers' load_image drops alpha from files, but composites an RGBA PIL image on white.
    with PIL.Image.open(rgba_png) as image:
        assert not np.allclose(preprocess_images(image, SIZE), preprocess_images(rgba_png, SIZE), atol=0.1)


def _bad_files(tmp_path: Path) -> list[Path]:
    buf = io.BytesIO()
    PIL.Image.fromarray(skimage.data.coffee()).save(buf, format="JPEG")
    truncated_jpeg = tmp_path / "truncated.jpg"
    truncated_jpeg.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    PIL.Image.fromarray(skimage.data.coffee()).save(buf, format="PNG")
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(buf.getvalue()[:2000])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\nat all\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return [truncated_jpeg, truncated_png, text, empty, tmp_path / "missing.png", tmp_path]


def test_unreadable_files_raise_naming_the_file(tmp_path):
    for path in _bad_files(tmp_path):
        for arg in (path, str(path)):
            with pytest.raises(ProcessorError) as info:
                preprocess_images([arg], SIZE)
            message = str(info.value)
            assert str(path) in message and "\n" not in message, message
            assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "shape"),
        (np.zeros((2, 3, 4, 4, 3), np.uint8), "shape"),
        (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan), r"\[0, 1\]"),
        (np.zeros((4, 4, 3), np.int16), "dtype"),
        (PIL.Image.new("La", (4, 4)), "mode 'La'"),
        (b"bytes", "unsupported image type"),
    ],
)
def test_bad_image_inputs_raise(bad, match):
    with pytest.raises(ProcessorError, match=match):
        preprocess_images([bad], SIZE)


def test_bad_image_arguments_raise():
    with pytest.raises(ProcessorError, match="no images"):
        preprocess_images([], SIZE)
    for size in (0, True, 224.0, "224", 10**6):
        with pytest.raises(ProcessorError, match=r"^image size must be an int in \[1, 4096\], got "):
            preprocess_images(_noise, size)
    for images, name in ((5, "int"), (None, "NoneType"), (b"a.png", "bytes"), ({"a": 1}, "dict")):
        with pytest.raises(ProcessorError, match=f"^images must be an image .* or a list of them, got {name}$"):
            preprocess_images(images, SIZE)


def test_one_path_string_is_one_image():
    assert image_list("a.png") == ["a.png"]  # never its characters
    assert image_list(Path("a.png")) == [Path("a.png")]
    assert len(image_list(np.zeros((2, 4, 4, 3), np.uint8))) == 2 and len(image_list(np.zeros((4, 4)))) == 1
    assert image_list(iter(["a.png", "b.png"])) == ["a.png", "b.png"]


def test_images_in_memory_obey_the_file_limits(monkeypatch):
    """Arrays and PIL images are held to the pixel and side limits of files, before any conversion."""
    # 1 x 100,000,000 pixels (within the pixel limit, but PIL's resize would ask for gigabytes of
    # filter weights); a broadcast view, so the test itself holds no memory.
    long = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (1, 100_000_000, 3))
    with pytest.raises(ProcessorError, match=r"^the image array is 100000000x1 pixels, a side longer than the limit"):
        load_image(long)
    monkeypatch.setattr(processor, "MAX_IMAGE_PIXELS", 99)
    for image, what in ((np.zeros((10, 10, 3), np.uint8), "the image array"),
                        (np.zeros((10, 10), np.float32), "the image array"),
                        (PIL.Image.new("RGB", (10, 10)), "the PIL image")):
        with pytest.raises(ProcessorError, match=f"^{what} is 10x10 pixels, more than the limit of 99"):
            preprocess_images([image], SIZE)
    assert preprocess_images(np.zeros((9, 11, 3), np.uint8), SIZE).shape == (1, SIZE, SIZE, 3)


def test_draw_detections_checks_its_arguments():
    box = Detection(1, 1, 5, 5, "cat")
    for image, detections, message in ((None, [box], "image must be a PIL image .* got NoneType"),
                                       ("cat.png", [box], "got str"),
                                       (np.zeros((8, 8, 3), np.uint8), box, "detections must be a list of Detection"),
                                       (np.zeros((8, 8, 3), np.uint8), [box, "dog"], r"detections\[1\] must be a Detection")):
        with pytest.raises(UserError, match=message):
            draw_detections(image, detections)


def test_parse_detections_checks_its_arguments():
    with pytest.raises(UserError, match="^text must be a string .*, got bytes$"):
        parse_detections(b"<loc0000>", 10, 10)
    for width, height, bad in ((0, 10, "width"), (10, 2.5, "height"), (True, 10, "width"), ("10", 10, "width")):
        with pytest.raises(UserError, match=f"^the image's {bad} must be an int >= 1"):
            parse_detections("cat", width, height)
    with pytest.raises(UserError, match="more than the limit"):
        parse_detections("cat", 10**5, 10**5)
    assert parse_detections("<loc0000><loc0000><loc0512><loc0512> cat", np.int64(100), 100)[0].xmax == 50


# ---- tokenizer ------------------------------------------------------------------------------------

PROMPTS = [
    "",
    " ",
    "caption en",
    "caption es",
    "answer en what is in the image?",
    "answer en What colour is the car?",
    "question: how many apples are there?",
    "detect cat",
    "detect cat ; dog ; red car",
    "segment the person on the left",
    "ocr",
    "describe the scene in detail",
    "Hello, world!",
    "a  b   c    d     e",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs",
    "line one\nline two",
    "\n",
    "\n\n\nthree newlines",
    "windows\r\nline end",
    "0",
    "1234567890",
    "3.14159 and 2.71828",
    "$1,000,000.00 (approx.) - 42%",
    "at 10:30am on 2024-05-17",
    "café naïve Zürich façade",
    "¿Qué es esto? ¡Mira!",
    "straße ß ẞ",
    "e\u0301 (combining accent)",
    "東京タワーの写真",
    "서울의 밤",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Καλημέρα κόσμε",
    "emoji 🙂🚀🐱",
    "family 👩\u200d👩\u200d👧 zwj",
    "flag 🇫🇷 and 🏳️\u200d🌈",
    "<loc0000>",
    "<loc0000><loc0512><loc1023><loc0001> cat",
    "detect cat <loc0100><loc0200><loc0300><loc0400> cat ; dog",
    "<seg000><seg063><seg127>",
    "text<loc0042>text",
    "<loc9999> not a loc token",
    "<seg12> <loc12> almost",
    "<b>bold</b> <i>html</i>",
    "a;b;c|d\\e/f",
    "quotes 'single' \"double\" `back`",
    "~!@#$%^&*()_+-={}[]:;<>?,./",
    "mixed 中文 English 123 🙂",
    "The quick brown fox jumps over the lazy dog. " * 8,
    "\u00a0non-breaking\u2003em space",
    "zero\u200bwidth",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
]
SUFFIXES = [
    "a cat sitting on a bench",
    "",
    "<loc0100><loc0200><loc0300><loc0400> cat ; <loc0000><loc0000><loc1023><loc1023> dog",
    "un gato 🐱",
    "42",
    "two  spaces\nand a newline",
    "<loc0010><loc0020><loc0030><loc0040>" + "".join(SEG_TOKENS[i] for i in range(0, 128, 8)) + " person",
]


def test_tiny_tokenizer_layout(tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    assert [sp.piece_to_id(p) for p in (LOC_TOKENS[0], LOC_TOKENS[-1], SEG_TOKENS[0], SEG_TOKENS[-1])] == [
        5, 1028, 1029, 1156,
    ]
    assert sp.piece_to_id("\n") == 1157 and sp.get_piece_size() == 2000


def test_image_token_id_follows_hf(tokenizer, hf_processor, tokenizer_dir):
    # HF appends <image> after the sentencepiece vocabulary (it would append a <mask> first if the
    # model had none); an explicit id from the model config wins.
    assert tokenizer.image_token_id == hf_processor.image_token_id == tokenizer.vocab_size
    assert PaliGemmaTokenizer(tokenizer_dir / "tokenizer.model", image_token_id=4321).image_token_id == 4321


def test_prompt_layout(tokenizer):
    ids, types = tokenizer.encode_example("caption en", "a cat", num_image_tokens=3)
    prefix = tokenizer.encode("caption en\n")
    suffix = tokenizer.encode("a cat")
    assert ids == [tokenizer.image_token_id] * 3 + [tokenizer.bos_id] + prefix + suffix + [tokenizer.eos_id]
    assert types == [0] * (4 + len(prefix)) + [1] * (len(suffix) + 1)
    # loc/seg tokens are atomic pieces.
    assert tokenizer.encode("<loc0007><seg003>") == [
        tokenizer.sp.piece_to_id("<loc0007>"), tokenizer.sp.piece_to_id("<seg003>"),
    ]


def test_example_ids_match_hf(tokenizer, hf_processor):
    assert len(PROMPTS) >= 50
    for i, prefix in enumerate(PROMPTS):
        for suffix in (None, SUFFIXES[i % len(SUFFIXES)]):
            ours = tokenizer([prefix], None if suffix is None else [suffix], num_image_tokens=NUM_IMAGE_TOKENS)
            ref = hf_encode(hf_processor, [prefix], None if suffix is None else [suffix])
            assert ours.input_ids.tolist() == ref["input_ids"].tolist(), (prefix, suffix)
            assert ours.token_type_ids.tolist() == ref["token_type_ids"].tolist(), (prefix, suffix)
            assert ours.attention_mask.tolist() == ref["attention_mask"].tolist(), (prefix, suffix)


@pytest.mark.parametrize("with_suffix", [False, True])
def test_left_padded_batch_matches_hf(tokenizer, hf_processor, with_suffix):
    suffixes = [SUFFIXES[i % len(SUFFIXES)] for i in range(len(PROMPTS))] if with_suffix else None
    ours = tokenizer(PROMPTS, suffixes, num_image_tokens=NUM_IMAGE_TOKENS)
    ref = hf_encode(hf_processor, PROMPTS, suffixes, padding="longest")
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        array = getattr(ours, name)
        assert array.dtype == np.int32
        np.testing.assert_array_equal(array, ref[name], err_msg=name)
    # HF's labels: suffix tokens only (its pads have token type 0, so they are masked too).
    np.testing.assert_array_equal(ours.loss_mask, ref["labels"] != -100)
    assert ours.loss_mask.any() == with_suffix


def test_right_padding_to_max_length_matches_hf(tokenizer, hf_processor):
    prompts, suffixes = PROMPTS[:12], [SUFFIXES[i % len(SUFFIXES)] for i in range(12)]
    ours = tokenizer(
        prompts, suffixes, num_image_tokens=NUM_IMAGE_TOKENS, padding_side="right", max_length=96,
        pad_to_max_length=True,
    )
    ref = hf_encode(hf_processor, prompts, suffixes, padding="max_length", max_length=96, padding_side="right")
    assert ours.input_ids.shape == (12, 96)
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(getattr(ours, name), ref[name], err_msg=name)
    np.testing.assert_array_equal(ours.loss_mask, ref["labels"] != -100)


def test_literal_control_strings_stay_text(tokenizer):
    # A deliberate difference from HF, which would turn these strings into control ids.
    ours = tokenizer(["say <bos> and <eos> and <pad> or <unk>"], num_image_tokens=2)
    ids = ours.input_ids[0].tolist()
    assert ids.count(tokenizer.bos_id) == 1
    assert not {tokenizer.eos_id, tokenizer.pad_id, tokenizer.sp.unk_id()} & set(ids)


def test_max_length(tokenizer):
    long_prompt = "describe the scene in detail " * 20
    n = len(tokenizer.encode_example(long_prompt, "a cat", num_image_tokens=NUM_IMAGE_TOKENS)[0])
    with pytest.raises(ProcessorError, match=f"example 1 has {n} tokens.*max_length=40.*truncate=True"):
        tokenizer(["ocr", long_prompt], ["x", "a cat"], num_image_tokens=NUM_IMAGE_TOKENS, max_length=40)

    # The suffix is cut first, from its end (the <eos> goes with it).
    prefix_len = len(tokenizer.encode_example("caption en", num_image_tokens=NUM_IMAGE_TOKENS)[0])
    full, _ = tokenizer.encode_example("caption en", "a cat sitting on a bench", num_image_tokens=NUM_IMAGE_TOKENS)
    cut = tokenizer("caption en", "a cat sitting on a bench", num_image_tokens=NUM_IMAGE_TOKENS,
                    max_length=prefix_len + 2, truncate=True)
    assert cut.input_ids[0].tolist() == full[: prefix_len + 2]
    assert cut.loss_mask[0].sum() == 2

    # Then the prefix text, keeping its closing newline.
    cut = tokenizer([long_prompt], ["a cat"], num_image_tokens=NUM_IMAGE_TOKENS, max_length=40, truncate=True)
    ids = cut.input_ids[0].tolist()
    assert len(ids) == 40 and ids[-1] == tokenizer.sp.piece_to_id("\n") and not cut.loss_mask.any()
    assert ids[:NUM_IMAGE_TOKENS + 1] == [tokenizer.image_token_id] * NUM_IMAGE_TOKENS + [tokenizer.bos_id]

    with pytest.raises(ProcessorError, match="cannot hold"):
        tokenizer([long_prompt], num_image_tokens=NUM_IMAGE_TOKENS, max_length=NUM_IMAGE_TOKENS + 1, truncate=True)
    with pytest.raises(ProcessorError, match="need max_length"):
        tokenizer(["ocr"], num_image_tokens=NUM_IMAGE_TOKENS, truncate=True)


def test_bad_text_arguments(tokenizer, tmp_path):
    with pytest.raises(ProcessorError, match="2 suffixes for 1 prefixes"):
        tokenizer(["ocr"], ["a", "b"], num_image_tokens=1)
    with pytest.raises(ProcessorError, match="padding_side"):
        tokenizer(["ocr"], num_image_tokens=1, padding_side="middle")
    with pytest.raises(ProcessorError, match="no prompts"):
        tokenizer([], num_image_tokens=1)
    for prompts, message in ((b"caption en", "prompts must be a string or a list of strings, got bytes"),
                             (None, "prompts must be a string or a list of strings, got NoneType"),
                             (["ocr", 5], r"prompts\[1\] must be a string, got int")):
        with pytest.raises(ProcessorError, match=f"^{message}$"):
            tokenizer(prompts, num_image_tokens=1)
    with pytest.raises(ProcessorError, match=r"^suffixes\[0\] must be a string, got bytes$"):
        tokenizer(["ocr"], [b"x"], num_image_tokens=1)
    with pytest.raises(ProcessorError, match="tokenizer model not found"):
        PaliGemmaTokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ProcessorError, match="cannot load tokenizer model .*tokenizer.model"):
        PaliGemmaTokenizer(tmp_path)


def test_decode(tokenizer):
    loc = "<loc0100><loc0200><loc0300><loc0400>"
    answer = f"{loc} cat ; {loc} big dog 🐶"
    ids = tokenizer.encode(answer)
    generated = [tokenizer.image_token_id, tokenizer.bos_id, *ids, tokenizer.eos_id, *tokenizer.encode("junk")]
    assert tokenizer.decode(generated) == answer
    assert tokenizer.decode(np.array([tokenizer.pad_id, tokenizer.pad_id, *ids])) == answer
    assert tokenizer.decode(ids, skip_loc_seg=True) == " cat ;  big dog 🐶"
    # Ids past the sentencepiece vocabulary (padding rows of the embedding) are dropped.
    assert tokenizer.decode([tokenizer.vocab_size + 5, *ids]) == answer
    batch = np.array([ids + [tokenizer.eos_id], [tokenizer.pad_id] + ids])
    assert tokenizer.batch_decode(batch) == [answer, answer]
    for prompt in PROMPTS:
        assert tokenizer.decode(tokenizer.encode(prompt)) == prompt


# ---- processor ------------------------------------------------------------------------------------


def test_processor_matches_hf(tokenizer, hf_processor):
    images = [skimage.data.astronaut(), PIL.Image.fromarray(skimage.data.camera()), _noise]
    prompts, suffixes = ["caption en", "detect cat ; dog", "answer en what is this?"], ["a", "b c", ""]
    ours = PaliGemmaProcessor(tokenizer, SIZE, NUM_IMAGE_TOKENS)(images, prompts, suffixes)
    ref = hf_processor(text=prompts, images=images, suffix=suffixes, padding="longest", return_tensors="np")
    assert np.abs(ours["pixel_values"] - np.asarray(ref["pixel_values"]).transpose(0, 2, 3, 1)).max() <= TOL
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[name], np.asarray(ref[name]), err_msg=name)
    with pytest.raises(ProcessorError, match="3 images for 2 prompts"):
        PaliGemmaProcessor(tokenizer, SIZE, NUM_IMAGE_TOKENS)(images, prompts[:2])


# ---- detection ------------------------------------------------------------------------------------


def test_parse_detections():
    seg = "".join(f"<seg{i:03d}>" for i in range(100, 116))
    text = (
        "<loc0256><loc0512><loc0768><loc1023> cat ; "
        "<loc0000><loc0000><loc0512><loc0512> big brown dog;"
        "<loc0100><loc0200><loc0300><loc0400>;"  # no label
        f"<loc0010><loc0020><loc0030><loc0040>{seg} person ; "
        "<loc0001><loc0002><loc0003> three locs only ; "
        "<loc0500><loc0500><loc0400><loc0400> swapped"
        "<loc0001><loc0002><loc0003><loc0004><seg001> partial seg"
    )
    dets = parse_detections(text, image_width=640, image_height=480)
    assert dets[0] == Detection(xmin=320.0, ymin=120.0, xmax=639.375, ymax=360.0, label="cat")
    assert dets[1] == Detection(xmin=0.0, ymin=0.0, xmax=320.0, ymax=240.0, label="big brown dog")
    assert dets[2].label == "" and dets[2].seg_codes is None
    assert dets[3].label == "person" and dets[3].seg_codes == tuple(range(100, 116))
    assert dets[4] == Detection(xmin=250.0, ymin=187.5, xmax=312.5, ymax=234.375, label="swapped")
    assert dets[5].label == "partial seg" and dets[5].seg_codes is None
    assert len(dets) == 6


@pytest.mark.parametrize(
    "text",
    ["", "a cat on a bench", "<loc0001><loc0002> cat", "<loc1024><loc0000><loc0010><loc0010> too big", "<loc12><loc0001>"],
)
def test_parse_detections_ignores_malformed(text):
    assert parse_detections(text, 100, 100) == []


def test_parse_decoded_generation(tokenizer):
    text = "<loc0256><loc0512><loc0768><loc1023> cat ; <loc0000><loc0000><loc0512><loc0512> dog"
    generated = tokenizer.encode(text) + [tokenizer.eos_id]
    dets = parse_detections(tokenizer.decode(generated), 200, 100)
    assert [d.label for d in dets] == ["cat", "dog"] and dets[1].xmax == 100.0


def test_draw_detections_marks_box_edges():
    image = np.full((100, 200, 3), 255, np.uint8)
    dets = [Detection(xmin=50, ymin=40, xmax=150, ymax=90, label="cat"), Detection(0, 0, 20, 20, "")]
    drawn = draw_detections(image, dets, color=(255, 0, 0))
    out = np.asarray(drawn)
    assert isinstance(drawn, PIL.Image.Image) and out.shape == image.shape
    red = (out == [255, 0, 0]).all(-1)
    for y, x in [(40, 100), (90, 100), (65, 50), (65, 150), (0, 10), (20, 10), (10, 0)]:  # edges
        assert red[y, x], (y, x)
    assert not red[65, 100] and not red[95, 100]  # inside and outside the box
    assert red[25:40, 50:60].any()  # label tab above the box
    assert np.array_equal(image, np.full((100, 200, 3), 255, np.uint8))  # input untouched
    assert np.array_equal(np.asarray(draw_detections(PIL.Image.fromarray(image), dets, color=(255, 0, 0))), out)


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_load_image_refuses(images, name):
    with pytest.raises(UserError) as info:
        load_image(images[name])
    assert BAD_IMAGES[name] in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(GOOD_IMAGES))
def test_odd_images_load_right(tmp_path, case):
    write, check = GOOD_IMAGES[case]
    path = write(tmp_path)
    image = load_image(path)
    assert image.mode == "RGB" and check(image), (image.size, image.getpixel((0, 0)))
    pixels = preprocess_images(path, 16)
    assert pixels.shape == (1, 16, 16, 3) and np.isfinite(pixels).all() and np.abs(pixels).max() <= 1


def test_loc_tokens_are_tokens_and_eos_is_text(tiny_pg):
    """`<loc0001>` is one token (as in transformers); `<eos>` / `<bos>` stay literal text (a
    prompt cannot end itself early); an empty prompt is `<image>`s, `<bos>`, then the newline."""
    tok = tiny_pg.tokenizer
    loc = tok.encode("detect <loc0001>")
    assert tok.sp.piece_to_id("<loc0001>") in loc
    ids = tok(["stop <eos> here <bos>"], num_image_tokens=tiny_pg.config.num_image_tokens).input_ids[0].tolist()
    assert tok.eos_id not in ids and ids.count(tok.bos_id) == 1
    empty = tok([""], num_image_tokens=tiny_pg.config.num_image_tokens).input_ids[0].tolist()
    assert empty == [tiny_pg.config.image_token_id] * tiny_pg.config.num_image_tokens + [tok.bos_id] + tok.encode("\n")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tokenizer.model").unlink(), "no tokenizer.model"),
    (_write("tokenizer.model", b""), "cannot load tokenizer model"),
    (_write("tokenizer.model", b"\x08\x01random-bytes" * 40), "cannot load tokenizer model"),
])
def test_tokenizer_problems_are_one_line(converted, images, damage, message):
    """A converted directory whose tokenizer is missing or damaged loads (arrays still work) and
    says so at the first text prompt."""
    damage(converted)
    (converted / MANIFEST_FILE).unlink()  # as if written without one; else loading refuses the resized file
    loaded = PaliGemma.from_pretrained(converted)
    with pytest.raises(UserError, match=message):
        loaded.tokenizer
    with pytest.raises(UserError, match=message):
        loaded.generate(images["good"], "caption en")
