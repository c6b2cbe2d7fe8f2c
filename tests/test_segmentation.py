"""The mask VQ-VAE against a PyTorch reference on random weights under vae-oid.npz's names and shapes,
the paste-back, mask -> training tokens, and COCO run-length encoding."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask

from pali_jax import segmentation as seg
from pali_jax.errors import UserError

DIM = 512  # the real file's codebook width; the decoder and encoder widths below are the real ones
DECODER_UP = ((128, 128), (128, 64), (64, 32), (32, 16))  # ConvTranspose2d (in, out)
# Encoder stride-2 convs (in, out, kernel): one odd kernel checks TensorFlow's asymmetric "SAME".
ENCODER_DOWN = ((1, 16, 4), (16, 32, 4), (32, 64, 3), (64, 128, 4))


def _conv_weight(rng, out_c, in_c, k, gain=1.5):
    return (rng.standard_normal((out_c, in_c, k, k)) * gain / math.sqrt(in_c * k * k)).astype(np.float32)


def _random_vae(rng: np.random.Generator, encoder: bool = True) -> dict[str, np.ndarray]:
    """Random weights under vae-oid.npz's member names, in PyTorch layouts."""
    w: dict[str, np.ndarray] = {"_vq_vae._embedding": rng.standard_normal((128, DIM)).astype(np.float32)}

    def conv(name, out_c, in_c, k, gain=1.5):
        w[name + ".weight"] = _conv_weight(rng, out_c, in_c, k, gain)
        w[name + ".bias"] = (rng.standard_normal(out_c) * 0.1).astype(np.float32)

    def res(name, c):
        conv(name + ".0", c, c, 3), conv(name + ".2", c, c, 3), conv(name + ".4", c, c, 1, 0.5)

    conv("decoder.0", 128, DIM, 1)
    res("decoder.2.net", 128), res("decoder.3.net", 128)
    for name, (cin, cout) in zip(("decoder.4", "decoder.6", "decoder.8", "decoder.10"), DECODER_UP):
        w[name + ".weight"] = (rng.standard_normal((cin, cout, 4, 4)) * 2.0 / math.sqrt(cin * 4)).astype(np.float32)
        w[name + ".bias"] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    conv("decoder.12", 1, 16, 1, 0.5)
    if encoder:
        for name, (cin, cout, k) in zip(("encoder.0", "encoder.2", "encoder.4", "encoder.6"), ENCODER_DOWN):
            conv(name, cout, cin, k)
        res("encoder.8.net", 128), res("encoder.9.net", 128)
        conv("encoder.10", DIM, 128, 1, 4.0)
    return w


# -- the independent reference: the PyTorch modules the file's names come from ------------------
class _TorchRes(torch.nn.Module):
    def __init__(self, c: int, same: bool = False):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1),
            torch.nn.ReLU(), torch.nn.Conv2d(c, c, 1),
        )

    def forward(self, x):
        return x + self.net(x)


class _TfSameConv(torch.nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (big_vision's encoder runs tf.nn.conv2d)."""

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        total = max(k - s, 0) if x.shape[-1] % s == 0 else max(k - x.shape[-1] % s, 0)
        return super().forward(F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2)))


def _torch_vae(weights: dict[str, np.ndarray]) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    layers = [torch.nn.Conv2d(DIM, 128, 1), torch.nn.ReLU(), _TorchRes(128), _TorchRes(128)]
    for cin, cout in DECODER_UP:
        layers += [torch.nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), torch.nn.ReLU()]
    layers.append(torch.nn.Conv2d(16, 1, 1))
    module = torch.nn.Module()
    module.decoder = torch.nn.Sequential(*layers)
    if "encoder.0.weight" in weights:
        enc = []
        for cin, cout, k in ENCODER_DOWN:
            enc += [_TfSameConv(cin, cout, k, stride=2), torch.nn.ReLU()]
        enc += [_TorchRes(128), _TorchRes(128), torch.nn.Conv2d(128, DIM, 1)]
        module.encoder = torch.nn.Sequential(*enc)
    state = {k: torch.from_numpy(v) for k, v in weights.items() if k != "_vq_vae._embedding"}
    module.load_state_dict(state, strict=True)  # every file name is a module parameter: names and shapes right
    return module.decoder.eval(), getattr(module, "encoder", None)


def _torch_decode(decoder, codebook, codes):
    latent = torch.from_numpy(codebook[codes.reshape(-1)]).reshape(len(codes), 4, 4, DIM).permute(0, 3, 1, 2)
    with torch.no_grad():
        return decoder(latent)[:, 0].numpy()


def _torch_encode(encoder, codebook, masks64):
    x = torch.from_numpy(2.0 * (masks64[:, None] - 0.5)).float()
    with torch.no_grad():
        z = encoder(x).permute(0, 2, 3, 1).reshape(-1, DIM).double()
    e = torch.from_numpy(codebook).double()
    d = (z**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * z @ e.T
    return d.argmin(1).reshape(-1, 16).numpy(), d.numpy()


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    weights = _random_vae(np.random.default_rng(0))
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **weights)
    decoder, encoder = _torch_vae(weights)
    return dict(path=path, weights=weights, torch_decoder=decoder, torch_encoder=encoder,
                model=seg.MaskDecoder.from_npz(path))


def test_decoder_matches_torch(vae):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 128, (5, 16))
    ours = vae["model"].decode(codes)
    ref = _torch_decode(vae["torch_decoder"], vae["weights"]["_vq_vae._embedding"], codes)
    assert ours.shape == (5, 64, 64) and ours.dtype == np.float32
    assert np.abs(ref).max() > 0.3 and np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()
    # One row alone (batch padded to 1, not 8): the same to the reference's tolerance (XLA's conv
    # kernels round differently per batch size).
    assert np.abs(vae["model"].decode(codes[2:3])[0] - ref[2]).max() <= 1e-5


def test_decoder_rejects_bad_codes(vae):
    for bad in (np.zeros((2, 15), int), np.full((1, 16), 128), np.full((1, 16), -1), np.zeros(16, int),
                np.zeros((1, 16), np.float32), None, "codes", [[1] * 16, [2] * 15], np.full((1, 16), 2**32 + 1)):
        with pytest.raises(UserError) as e:
            vae["model"].decode(bad)
        assert "\n" not in str(e.value)


def test_decoding_runs_in_chunks(vae, monkeypatch):
    codes = np.random.default_rng(2).integers(0, 128, (11, 16))
    ref = _torch_decode(vae["torch_decoder"], vae["weights"]["_vq_vae._embedding"], codes)
    monkeypatch.setattr(seg, "CHUNK_ROWS", 4)  # 4 + 4 + 3 rows, the last chunk padded
    ours = vae["model"].decode(codes)
    assert ours.shape == (11, 64, 64) and np.abs(ours - ref).max() <= 1e-5
    masks = (ours > 0).astype(np.float32)
    np.testing.assert_array_equal(vae["model"].encode(masks), np.concatenate(
        [vae["model"].encode(masks[i : i + 1]) for i in range(11)]))


def test_a_batch_beyond_memory_is_refused_before_it_runs(vae, monkeypatch):
    from pali_jax import generation_config

    model = vae["model"]
    # 10**8 rows would need 1.6 TB of results: refused from the shape (a broadcast view: no memory used).
    huge = np.broadcast_to(np.zeros((1, 16), np.int32), (10**8, 16))
    with pytest.raises(UserError, match=r"^the mask VAE needs .* GiB for the results of 100000000 rows of codes "
                                        r"\(256 per compiled call\), more than .*: pass fewer codes per call$"):
        model.decode(huge)
    with pytest.raises(UserError, match="10000000000 rows of masks"):  # 640 GB of codes
        model.encode(np.broadcast_to(np.zeros((1, 64, 64), np.float32), (10**10, 64, 64)))
    # The check counts the chunk program as XLA compiles it (arguments, outputs, temporaries), not
    # only the results: 3 rows (a chunk of 4) need their 3 results plus that program.
    program = model._decode.lower(*model._resident, jax.ShapeDtypeStruct((4, 16), jnp.int32)).compile()
    stats = program.memory_analysis()
    assert stats.temp_size_in_bytes > 3 * 64 * 64 * 4
    resident = sum(x.nbytes for x in jax.tree.leaves(model._resident))
    need = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - resident
    default = jax.devices()[0].platform
    need += 3 * 64 * 64 * 4 if default == "cpu" else 0  # on CPU the results share the program's memory
    codes = np.zeros((3, 16), np.int32)
    for free, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(generation_config, "free_memory", lambda device, free=free: (
            free if device.platform == default else 2**50, "memory"))
        if refused:
            with pytest.raises(UserError, match="3 rows of codes"):
                model.decode(codes)
        else:
            assert model.decode(codes).shape == (3, 64, 64)


def test_bad_vae_files(tmp_path, vae):
    with pytest.raises(UserError, match="not found"):
        seg.MaskDecoder.from_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read"):
        seg.MaskDecoder.from_npz(tmp_path / "junk.npz")
    w = dict(vae["weights"])
    del w["decoder.6.bias"]
    with pytest.raises(UserError, match="decoder.6.bias"):
        seg.MaskDecoder(w)
    w = dict(vae["weights"], **{"decoder.3.net.2.weight": np.zeros((128, 128, 1, 1), np.float32)})
    with pytest.raises(UserError, match="ResBlock_1/Conv_1/kernel"):
        seg.MaskDecoder(w)
    decoder_only = seg.MaskDecoder({k: v for k, v in vae["weights"].items() if not k.startswith("encoder.")})
    assert not decoder_only.has_encoder
    with pytest.raises(UserError, match="no encoder"):
        decoder_only.encode(np.zeros((1, 64, 64)))


def _one_line_refusal(path, match):
    with pytest.raises(UserError, match=match) as e:
        seg.MaskDecoder.from_npz(path)
    assert "\n" not in str(e.value)


def test_vae_files_are_checked_as_data(tmp_path, vae):
    """Strings, NaN, wrong ranks, a bare .npy and a damaged archive: one line each, at load."""
    bad = {
        "text": dict(vae["weights"], **{"decoder.4.bias": np.array(["a"] * 128)}),
        "nan": dict(vae["weights"], **{"decoder.12.weight": np.full((1, 16, 1, 1), np.nan, np.float32)}),
        "inf_encoder": dict(vae["weights"], **{"encoder.0.bias": np.full(16, np.inf, np.float32)}),
        "rank": dict(vae["weights"], **{"decoder.0.weight": np.zeros(128, np.float32)}),
        "bools": dict(vae["weights"], **{"_vq_vae._embedding": np.zeros((128, DIM), bool)}),
    }
    messages = {"text": "'decoder.4.bias' holds dtype <U1", "nan": "'decoder.12.weight' holds NaN",
                "inf_encoder": "'encoder.0.bias' holds NaN or infinite", "rank": r"'decoder.0.weight' has shape \[128\]",
                "bools": "holds dtype bool"}
    for name, weights in bad.items():
        np.savez(tmp_path / f"{name}.npz", **weights)
        _one_line_refusal(tmp_path / f"{name}.npz", messages[name])
    np.save(tmp_path / "bare.npy", vae["weights"]["decoder.0.bias"])
    _one_line_refusal(tmp_path / "bare.npy", "not an .npz archive")
    # One flipped byte inside a stored member: zip's CRC check refuses it.
    data = bytearray(vae["path"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    _one_line_refusal(tmp_path / "crc.npz", "Bad CRC-32")
    with pytest.raises(UserError, match="mapping of names to arrays, got list"):
        seg.MaskDecoder([1, 2])


def _blob_masks(rng, n, size=64):
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        m = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx, ry, rx = rng.uniform(0, size, 2).tolist() + rng.uniform(4, 30, 2).tolist()
            m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks.append(m)
    return np.stack(masks).astype(np.float32)


def test_encoder_matches_torch(vae):
    masks = _blob_masks(np.random.default_rng(2), 50)
    ours = vae["model"].encode(masks)
    ref, distances = _torch_encode(vae["torch_encoder"], vae["weights"]["_vq_vae._embedding"], masks)
    assert ours.shape == (50, 16) and len(np.unique(ref)) > 10  # the codes vary: the test can fail
    flat_d, o, r = distances, ours.reshape(-1), ref.reshape(-1)
    rows = np.arange(len(o))
    # Ties aside: where the codes differ, the reference's two distances must be equal to rounding.
    gap = np.abs(flat_d[rows, o] - flat_d[rows, r]) / np.abs(flat_d[rows, r]).clip(1.0)
    assert (gap[o != r] < 1e-5).all(), gap[o != r]
    assert (o != r).sum() <= 2


def test_resize_matches_jax_antialiased():
    rng = np.random.default_rng(3)
    for shape in ((200, 97), (64, 64), (13, 40), (1, 3)):
        img = rng.uniform(size=shape).astype(np.float32)
        ref = np.asarray(jax.image.resize(jnp.asarray(img), (64, 64), "bilinear", antialias=True))
        np.testing.assert_allclose(seg.resize_antialiased(img, 64, 64), ref, atol=2e-6)


def test_mask_tokens(vae):
    rng = np.random.default_rng(4)
    h, w = 300, 457
    mask = np.zeros((h, w), bool)
    mask[40:251, 100:333] = _blob_masks(rng, 1, 256)[0][:211, :233] > 0
    mask[40, 100:333] = mask[250, 100:333] = mask[40:251, 100] = mask[40:251, 332] = True
    locs, codes = vae["model"].mask_tokens(mask)
    # The tight box as big_vision's fractions, binned by round(f * 1023).
    assert locs == tuple(round(v * 1023) for v in (40 / h, 100 / w, 251 / h, 333 / w))
    crop = np.asarray(jax.image.resize(jnp.asarray(mask[40:251, 100:333], jnp.float32), (64, 64), "bilinear",
                                       antialias=True))
    assert codes == tuple(vae["model"].encode(crop[None])[0])
    # An explicit box, and uint8 0/255 masks read as 0/1.
    locs2, codes2 = vae["model"].mask_tokens(mask.astype(np.uint8) * 255, box=(100, 40, 333, 251))
    assert (locs2, codes2) == (locs, codes)
    suffix = vae["model"].mask_suffix(mask, label="cat")
    assert suffix == "".join(f"<loc{v:04d}>" for v in locs) + "".join(f"<seg{c:03d}>" for c in codes) + " cat"
    with pytest.raises(UserError, match="empty"):
        vae["model"].mask_tokens(np.zeros((10, 10), bool))
    with pytest.raises(UserError, match="inside"):
        vae["model"].mask_tokens(mask, box=(0, 0, w + 1, 10))


def _expected_paste(logits, locs, h, w):
    """big_vision's evaluator, written out: box = loc / 1023 * size, int(); PIL bilinear; > 0."""
    y1, x1, y2, x2 = (int(v / 1023 * s) for v, s in zip(locs, (h, w, h, w)))
    out = np.zeros((h, w), bool)
    if x2 <= x1 or y2 <= y1:
        return out
    resized = np.asarray(PIL.Image.fromarray(logits.astype(np.float32), mode="F").resize((x2 - x1, y2 - y1),
                                                                                          PIL.Image.BILINEAR))
    out[y1:y2, x1:x2] = resized > 0
    return out


@pytest.mark.parametrize("locs, h, w", [
    ((100, 200, 777, 901), 333, 517),   # odd box sizes
    ((0, 0, 1023, 1023), 241, 319),     # the whole image: touches every border
    ((0, 512, 1023, 1023), 100, 101),   # touching the right and top borders
    ((500, 500, 501, 503), 50, 50),     # degenerate after int(): an empty mask
    ((600, 100, 400, 300), 200, 200),   # swapped corners: empty
    ((10, 10, 13, 14), 4096, 4096),     # a few pixels
])
def test_paste_mask(vae, locs, h, w):
    logits = vae["model"].decode(np.random.default_rng(5).integers(0, 128, (1, 16)))[0]
    got = seg.paste_mask(logits, locs, h, w)
    assert got.shape == (h, w) and got.dtype == bool
    np.testing.assert_array_equal(got, _expected_paste(logits, locs, h, w))
    x1, y1, x2, y2 = seg.mask_box(locs, h, w)
    assert not got[:, :max(x1, 0)].any() and not got[:, x2:].any() and not got[:y1].any() and not got[y2:].any()


def test_mask_functions_check_their_arguments(vae):
    logits = np.ones((64, 64), np.float32)
    locs = (0, 0, 512, 512)
    for args, message in (
        ((logits, locs, 0, 10), "height must be an int >= 1"),
        ((logits, locs, 10, 2.5), "width must be an int >= 1"),
        ((logits, locs, 10**5, 10**5), "more than the limit"),
        ((logits, "0 0 512 512", 10, 10), "locs must be 4 <loc> bins"),
        ((logits, (0, 0, 512), 10, 10), "locs must be 4 <loc> bins"),
        ((logits, (0.0, 0, 512, 512), 10, 10), "locs must be 4 <loc> bins"),
        ((None, locs, 10, 10), "mask logits must be an array of numbers, got NoneType"),
        ((logits[:8], locs, 10, 10), r"mask logits must be \[64, 64\]"),
    ):
        with pytest.raises(UserError, match=message) as e:
            seg.paste_mask(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="a mask must be an array of numbers, got NoneType"):
        vae["model"].mask_tokens(None)
    with pytest.raises(UserError, match="a mask file must be a path, got int"):
        seg.load_mask(5)
    assert seg.paste_mask(logits, np.array(locs), 10, 10).sum() == 25


def test_paste_mask_geometry():
    """A mask that is inside on its left half fills the left half of its box, whatever the box."""
    logits = np.where(np.arange(64)[None, :] < 32, 1.0, -1.0).repeat(64, 0).astype(np.float32)
    got = seg.paste_mask(logits, (0, 0, 1023, 1023), 40, 30)
    np.testing.assert_array_equal(got, np.arange(30)[None, :].repeat(40, 0) < 15)
    full = seg.paste_mask(np.ones((64, 64), np.float32), (100, 100, 900, 700), 97, 131)
    x1, y1, x2, y2 = seg.mask_box((100, 100, 900, 700), 97, 131)
    assert (x1, y1, x2, y2) == (12, 9, 89, 85) and full.sum() == (x2 - x1) * (y2 - y1) and full[y1:y2, x1:x2].all()


@pytest.mark.parametrize("seed", range(4))
def test_rle_decodes_with_pycocotools(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 70, 2)
    masks = [rng.uniform(size=(h, w)) < p for p in (0.0, 1.0, 0.1, 0.5, 0.97)]
    masks.append(_blob_masks(rng, 1, 64)[0] > 0)
    for m in masks:
        rle = seg.rle_encode(m)
        np.testing.assert_array_equal(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}), m)
        # The fallback writer gives pycocotools' string, and the reader inverts it.
        own = seg._rle_string(seg._run_lengths(m))
        assert own == rle["counts"]
        np.testing.assert_array_equal(seg.rle_decode({"size": list(m.shape), "counts": own}), m)


# -- wired through: PaliGemma.generate and run_generate.py ----------------------------------------
LOCS = (100, 200, 800, 900)
CODES = tuple(range(3, 115, 7))


def _fake_segment_answer(monkeypatch, label: str = "circle"):
    """Makes every generation answer `<loc>x4 <seg>x16 label` (the model's part is tested elsewhere;
    this checks what is done with the answer)."""
    from pali_jax.decode import GenerateOutput, StopReason
    from pali_jax.generate import Generator

    def fake(self, params, pixels, *args, **kwargs):
        tok = fake.tokenizer
        ids = [tok.sp.piece_to_id(f"<loc{v:04d}>") for v in LOCS] + [tok.sp.piece_to_id(f"<seg{c:03d}>") for c in CODES]
        ids += tok.encode(" " + label) + [tok.eos_id]
        n = len(pixels)
        return GenerateOutput(np.array([ids] * n), np.full(n, len(ids)), [StopReason.STOP_TOKEN] * n)

    from pali_jax.processor import PaliGemmaTokenizer

    fake.tokenizer = PaliGemmaTokenizer(run_generate_module().DEMO_DIR / "model")
    monkeypatch.setattr(Generator, "generate", fake)


def run_generate_module():
    from pali_jax import generate_command

    return generate_command


def test_generate_fills_masks(vae, monkeypatch):
    from pali_jax import PaliGemma, pretrained

    _fake_segment_answer(monkeypatch)
    monkeypatch.setattr(pretrained, "_warned_no_masks", False)
    image = sorted((run_generate_module().DEMO_DIR / "images").glob("*.png"))[0]
    w, h = PIL.Image.open(image).size
    pg = PaliGemma.from_pretrained(run_generate_module().DEMO_DIR / "model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [plain] = pg.generate(image, "segment circle")
        assert plain.boxes[0].seg_codes == CODES and plain.boxes[0].mask is None
        [again] = pg.generate([image, image], "segment circle")[:1]
    assert sum("--seg-vae" in str(w.message) for w in caught) == 1  # said once
    [res] = pg.generate(image, "segment circle", mask_decoder=vae["model"])
    expected = seg.paste_mask(vae["model"].decode([CODES])[0], LOCS, h, w)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(res.boxes[0].mask, expected)
    assert res.boxes[0].label == "circle"


def test_annotate_records_carry_the_generate_masks(vae):
    """A dataset job's result line holds the mask `generate` pastes (the shared `MaskDecoder.add_masks`)."""
    from pali_jax import PaliGemma
    from pali_jax.annotate import Item, _record
    from pali_jax.continuous import Answer
    from pali_jax.decode import StopReason

    pg = PaliGemma.from_pretrained(run_generate_module().DEMO_DIR / "model")
    tok = pg.tokenizer
    ids = [tok.sp.piece_to_id(f"<loc{v:04d}>") for v in LOCS] + [tok.sp.piece_to_id(f"<seg{c:03d}>") for c in CODES]
    ids += tok.encode(" circle") + [tok.eos_id]
    h, w = 120, 160
    record = _record(pg, Item("x.png", "segment circle"), Answer(0, ids, StopReason.STOP_TOKEN, 0.0), (w, h), 0.0,
                     vae["model"])
    [box] = record["boxes"]
    expected = seg.paste_mask(vae["model"].decode([CODES])[0], LOCS, h, w)
    assert expected.any() and box["label"] == "circle"
    decoded = coco_mask.decode({"size": box["mask"]["size"], "counts": box["mask"]["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), expected)


def test_cli_segment_masks(vae, tmp_path, monkeypatch, capsys):
    _fake_segment_answer(monkeypatch)
    rg = run_generate_module()
    image = tmp_path / "shapes.png"  # larger than the demo's 64 px, so the label covers little of the box
    PIL.Image.open(sorted((rg.DEMO_DIR / "images").glob("*.png"))[0]).resize((320, 240)).save(image)
    w, h = 320, 240
    monkeypatch.setenv(seg.ENV_VAR, str(vae["path"]))  # --seg-vae's default
    out_png, masks_dir = tmp_path / "overlay.png", tmp_path / "masks"
    from pali_jax import cli

    rc = cli.main(["generate", "--image", str(image), "--prompt", "segment circle", "--json", "--draw", str(out_png),
                  "--masks-dir", str(masks_dir), "--no-compilation-cache"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    import json

    [line] = [json.loads(x) for x in captured.out.splitlines()]
    [box] = line["boxes"]
    expected = seg.paste_mask(vae["model"].decode([CODES])[0], LOCS, h, w)
    assert box["label"] == "circle" and box["seg_codes"] == list(CODES)
    assert box["mask_box"] == list(seg.mask_box(LOCS, h, w)) and box["mask"]["size"] == [h, w]
    decoded = coco_mask.decode({"size": box["mask"]["size"], "counts": box["mask"]["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), expected)
    [png] = sorted(masks_dir.iterdir())
    assert png.name == f"{image.stem}_0_circle.png"
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(png)) > 0, expected)
    original = np.asarray(PIL.Image.open(image).convert("RGB")).astype(int)
    overlay = np.asarray(PIL.Image.open(out_png)).astype(int)
    assert overlay.shape == original.shape
    x1, y1, x2, y2 = seg.mask_box(LOCS, h, w)
    inner = np.zeros((h, w), bool)
    inner[y1 + 16 : y2 - 3, x1 + 3 : x2 - 3] = True  # away from the drawn box outline and its label tab
    changed = (overlay != original).any(-1)
    assert changed[expected & inner].mean() > 0.95 and not changed[~expected & inner].any()
    # Without a decoder: codes, no masks, a warning; --masks-dir then needs --seg-vae.
    monkeypatch.delenv(seg.ENV_VAR)
    assert cli.main(["generate", "--image", str(image), "--prompt", "segment circle", "--masks-dir",
                     str(masks_dir)]) == 2
    assert "--seg-vae" in capsys.readouterr().err


def test_jsonl_mask_lines(vae, tmp_path):
    import json

    from pali_jax.data import DataError, read_jsonl

    h, w = 120, 160
    PIL.Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((h, w), bool)
    mask[30:90, 20:121] = True
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "cat_mask.png")
    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    lines = [
        {"image": "img.png", "prefix": "segment cat", "mask": "cat_mask.png"},
        {"image": "img.png", "prefix": "segment cat", "mask": "cat_mask.png", "box": [10, 20, 130, 100]},
        {"image": "img.png", "prefix": "the cat on the left", "mask": "cat_mask.png", "label": ""},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, lines)))
    examples = read_jsonl(tmp_path / "train.jsonl", masks=vae["model"])
    assert examples[0].suffix == vae["model"].mask_suffix(mask, label="cat")
    assert examples[0].suffix.startswith(f"<loc{round(30 / h * 1023):04d}><loc{round(20 / w * 1023):04d}>")
    assert examples[1].suffix == vae["model"].mask_suffix(mask, (10, 20, 130, 100), "cat")
    assert examples[1].suffix != examples[0].suffix and examples[2].suffix == examples[0].suffix[: -len(" cat")]
    with pytest.raises(DataError, match=r"train.jsonl:1: .*--seg-vae"):
        read_jsonl(tmp_path / "train.jsonl")
    for bad, why in [
        ({"image": "img.png", "prefix": "segment cat", "mask": "small.png"}, "10x10, the image 160x120"),
        ({"image": "img.png", "prefix": "segment cat", "mask": "absent.png"}, "mask file not found"),
        ({"image": "img.png", "prefix": "segment cat", "mask": "cat_mask.png", "box": [1, 2]}, "field 'box'"),
        ({"image": "img.png", "prefix": "segment cat", "mask": "cat_mask.png", "suffix": "x"}, "not both"),
    ]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=why):
            read_jsonl(tmp_path / "bad.jsonl", masks=vae["model"])
