"""pali_jax.inspect (attention maps, rollout, logit lens, attributions) and pali_jax.plots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import PIL.Image
import pytest
from matplotlib.figure import Figure

from pali_jax import inspect as ins
from pali_jax import plots
from pali_jax.errors import UserError
from pali_jax.pretrained import PaliGemma
from test_paligemma import make_inputs

ROOT = Path(__file__).resolve().parents[1]

# ---- image attention ------------------------------------------------------------------------------

# 2 layers, 3 heads, 2 query rows, 20 keys: 2 text keys, then a 4 x 4 grid of image keys at 2..17,
# then 2 more. Every row is uniform (1/20 on each key) but layer 0 head 1, whose query 0 attends
# only to patch 6 = (1, 2) and query 1 only to patch 9 = (2, 1).
L, N, Q, S, START, P, G = 2, 3, 2, 20, 2, 16, 4


def hand_attention() -> np.ndarray:
    attn = np.full((L, N, Q, S), 1 / S, np.float32)
    attn[0, 1] = 0.0
    attn[0, 1, 0, START + 6] = 1.0
    attn[0, 1, 1, START + 9] = 1.0
    return attn


def one_hot_map(*cells_and_values) -> np.ndarray:
    out = np.zeros((G, G), np.float32)
    for (i, j), v in cells_and_values:
        out[i, j] = v
    return out


def test_image_attention_one_hot_patch_lands_on_its_cell():
    attn = hand_attention()
    one = ins.image_attention(attn, START, P, layers=0, heads=1, queries=0)
    np.testing.assert_array_equal(one, one_hot_map(((1, 2), 1.0)))
    assert np.unravel_index(one.argmax(), one.shape) == (6 // G, 6 % G)
    # The [L, N, S] row of one generated token is the same as picking that query row.
    np.testing.assert_array_equal(ins.image_attention(attn[:, :, 1], START, P, layers=0, heads=1),
                                  one_hot_map(((2, 1), 1.0)))
    # Span averaging: the two query rows share the head's attention.
    np.testing.assert_array_equal(ins.image_attention(attn, START, P, layers=[0], heads=[1]),
                                  one_hot_map(((1, 2), 0.5), ((2, 1), 0.5)))
    # Negative indices count from the end: layer -1 is layer 1, uniform.
    np.testing.assert_allclose(ins.image_attention(attn, START, P, layers=-1, heads=1), np.full((G, G), 1 / S))


def test_image_attention_reductions_and_stacks():
    attn = hand_attention()
    # Mean over 2 layers x 3 heads: five uniform rows (1/20) and one split 0.5 / 0.5 row.
    expected = np.full((G, G), 5 / S / 6) + one_hot_map(((1, 2), 0.5 / 6), ((2, 1), 0.5 / 6))
    np.testing.assert_allclose(ins.image_attention(attn, START, P), expected, rtol=1e-6)
    np.testing.assert_allclose(ins.image_attention(attn, START, P, reduce="max"),
                               np.maximum(np.full((G, G), 1 / S), one_hot_map(((1, 2), 0.5), ((2, 1), 0.5))))
    # normalize: the uniform rows' image share (16 / 20) becomes 1, spread as 1/16 per patch.
    np.testing.assert_allclose(ins.image_attention(attn, START, P, layers=1, normalize=True),
                               np.full((G, G), 1 / P), rtol=1e-6)
    stack = ins.image_attention(attn, START, P, per_layer=True, per_head=True)
    assert stack.shape == (L, N, G, G) and stack.dtype == np.float32
    np.testing.assert_array_equal(stack[0, 1], one_hot_map(((1, 2), 0.5), ((2, 1), 0.5)))
    assert ins.image_attention(attn, START, P, per_layer=True).shape == (L, G, G)
    heads = ins.image_attention(attn, START, P, per_head=True, heads=[2, 1])
    assert heads.shape == (2, G, G)
    np.testing.assert_allclose(heads[1], (np.full((G, G), 1 / S) + one_hot_map(((1, 2), 0.5), ((2, 1), 0.5))) / 2)


@pytest.mark.parametrize("call, message", [
    (lambda a: ins.image_attention(a[0, 0], START, P), r"\[L, N, Q, S\]"),
    (lambda a: ins.image_attention(a, START, 15), "positive square"),
    (lambda a: ins.image_attention(a, 10, P), "do not fit 20 keys"),
    (lambda a: ins.image_attention(a, START, P, layers=2), r"layers \[2\] out of range"),
    (lambda a: ins.image_attention(a, START, P, heads=[]), "non-empty"),
    (lambda a: ins.image_attention(a, START, P, queries=[0.5]), "ints"),
    (lambda a: ins.image_attention(a, START, P, reduce="median"), "'mean' or 'max'"),
    (lambda a: ins.attention_rollout(a[:, :, :, :5]), "square"),
    (lambda a: ins.attention_rollout([]), "at least one"),
    (lambda a: ins.attention_rollout(np.ones((2, 1, 3, 3)), residual=1.5), r"\[0, 1\]"),
    (lambda a: ins.upsample(np.ones(4), 3, 3), r"\[h, w\]"),
    (lambda a: ins.token_segments(np.ones((1, 4)), np.ones((1, 4)), None, 7), "one row"),
])
def test_bad_inputs_are_refused_in_one_line(call, message):
    with pytest.raises(UserError, match=message) as e:
        call(hand_attention())
    assert "\n" not in str(e.value)


# ---- rollout --------------------------------------------------------------------------------------


def test_answer_words_group_pieces():
    pieces = ["a", " red", " tri", "angle", "<loc0012>", "<loc0020>", " circle", ""]
    assert ins.answer_words(pieces) == [
        ("a", slice(0, 1)), ("red", slice(1, 2)), ("triangle", slice(2, 4)), ("<loc0012>", slice(4, 5)),
        ("<loc0020>", slice(5, 6)), ("circle", slice(6, 7)),
    ]


def test_word_attention_maps_average_a_words_tokens():
    n, layers, heads, keys = 3, 2, 2, P + 5  # the image first: a Result's own positions
    attn = np.zeros((n, layers, heads, keys), np.float32)
    attn[0, ..., 3] = 1.0  # "a": patch 3 = (0, 3)
    attn[1, ..., 6] = 1.0  # "tri" + "angle": patches 6 and 9, half each
    attn[2, ..., 9] = 1.0
    words, maps = ins.word_attention_maps(attn, ["a", " tri", "angle"], P)
    assert words == ["a", "triangle"] and maps.shape == (2, G, G)
    np.testing.assert_array_equal(maps[0], one_hot_map(((0, 3), 1.0)))
    np.testing.assert_array_equal(maps[1], one_hot_map(((1, 2), 0.5), ((2, 1), 0.5)))
    with pytest.raises(UserError, match="n = 2 tokens"):
        ins.word_attention_maps(attn, ["a", "b"], P)


def test_attention_rollout_by_hand():
    layer1 = np.array([[[1, 0], [0.5, 0.5]]] * 2)  # both heads alike
    layer2 = np.array([[[0, 1], [0, 1]], [[1, 0], [1, 0]]])  # head mean: 0.5 everywhere
    # residual 0.5: layer 1 -> [[1, 0], [.25, .75]], layer 2 -> [[.75, .25], [.25, .75]];
    # rollout = layer 2 @ layer 1.
    expected = np.array([[0.75 + 0.25 * 0.25, 0.25 * 0.75], [0.25 + 0.75 * 0.25, 0.75 * 0.75]])
    np.testing.assert_allclose(ins.attention_rollout([layer1, layer2]), expected, rtol=1e-6)
    np.testing.assert_allclose(ins.attention_rollout(np.stack([layer1, layer2]), residual=0.0),
                               layer2.mean(0) @ layer1.mean(0), rtol=1e-6)


# ---- logit lens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pg1", "pg2"])  # pg2 has a final soft cap: applied exactly once
def test_logit_lens_last_layer_is_the_models_softmax(tiny_models, kind):
    pg = tiny_models[kind].pg
    pixels, ids, types = make_inputs(pg, 2, 3, 4, seed=5)
    out = pg.forward(pixels, ids, types, output_hidden_states=True)
    states, logits = out.hidden_states, np.asarray(out.logits)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))  # [B, T, V]
    next_ids = np.roll(ids, -1, axis=1)
    lens = ins.logit_lens(pg, states, top_k=4, token_ids=next_ids)
    depth = pg.config.text.depth
    assert lens.top_ids.shape == lens.top_probs.shape == (depth + 1, *ids.shape, 4)
    assert lens.token_probs.shape == (depth + 1, *ids.shape)
    assert np.abs(lens.top_probs[-1] - np.sort(probs, -1)[..., ::-1][..., :4]).max() <= 1e-6
    assert np.abs(lens.token_probs[-1] - np.take_along_axis(probs, next_ids[..., None], -1)[..., 0]).max() <= 1e-6
    # top-k consistent with the probabilities: the ids' probabilities, in decreasing order.
    every_layer = lens.top_probs[:, :, :, 0] >= lens.top_probs[:, :, :, 1]
    assert every_layer.all()
    np.testing.assert_array_equal(lens.top_ids[-1, ..., 0], probs.argmax(-1))
    # An earlier layer is read through the final norm: by hand, and not the last layer's array.
    apply = lambda fn, x: np.asarray(pg.module.apply({"params": pg.params}, x, method=fn))  # noqa: E731
    first = jax.nn.softmax(apply(lambda m, x: m.llm.logits(m.llm.final_norm(x)), states[0]), axis=-1)
    np.testing.assert_allclose(lens.top_probs[0], np.sort(first, -1)[..., ::-1][..., :4], atol=1e-6)
    assert np.abs(lens.top_probs[0] - lens.top_probs[-1]).max() > 1e-3
    # One program per model and k: calls after the first do not trace again.
    ins.logit_lens(pg, states, top_k=4)
    ins.logit_lens(pg, states, top_k=4)
    assert ins._lens_program(pg.module, 4)._cache_size() == 2  # with token ids, and without


def test_logit_lens_refuses_bad_inputs(tiny_models):
    pg = tiny_models["pg1"].pg
    states = [np.zeros((1, 5, pg.config.text.width), np.float32)] * (pg.config.text.depth + 1)
    with pytest.raises(UserError, match="must hold 3 arrays"):
        ins.logit_lens(pg, states[:-1])
    with pytest.raises(UserError, match="of one shape"):
        ins.logit_lens(pg, states[:-1] + [np.zeros((1, 5, 7), np.float32)])
    with pytest.raises(UserError, match="top_k"):
        ins.logit_lens(pg, states, top_k=0)
    with pytest.raises(UserError, match=r"token_ids must be \[1, 5\]"):
        ins.logit_lens(pg, states, token_ids=np.zeros((1, 4), np.int32))


# ---- attributions ---------------------------------------------------------------------------------


def attribution_case(pg):
    """Two rows, 3 prompt and 4 suffix tokens; the last two suffix tokens are the targets."""
    pixels, ids, types = make_inputs(pg, 2, 3, 4, seed=7)
    target = np.zeros(ids.shape, bool)
    target[:, -2:] = True
    return pixels, ids, types, target


def target_log_prob(pg, pixels, ids, types, target) -> np.ndarray:
    """[B] the objective, independently: the model's float32 logits, log-softmax in float64."""
    logits = np.asarray(pg.forward(pixels, ids, types), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    scored = np.take_along_axis(log_probs, ids[:, 1:, None], -1)[..., 0]
    return (scored * target[:, 1:]).sum(-1)


def test_saliency_matches_finite_differences(tiny_models):
    pg = tiny_models["pg2"].pg
    pixels, ids, types, target = attribution_case(pg)
    grad = ins.saliency(pg, pixels, ids, types, None, target, reduce=None)
    assert grad.shape == pixels.shape
    np.testing.assert_array_equal(ins.saliency(pg, pixels, ids, types, None, target), np.abs(grad).max(-1))
    # Central differences on each row's three largest-gradient pixels. The forward is float32
    # (f ~ -18, rounding ~1e-6) and strongly curved along a pixel, so eps = 3e-3 balances
    # rounding (~1e-6 / eps) against truncation (~eps^2 f'''). Measured, as a fraction of the
    # largest |gradient| (0.52): 3.3e-4 at eps 3e-3; 1.6e-3 at 1e-3 (rounding), 1.7e-3 at 1e-2
    # and 1.5e-2 at 3e-2 (truncation).
    eps = 3e-3
    scale = np.abs(grad).max()
    for b in range(2):
        for flat in np.argsort(-np.abs(grad[b]).ravel())[:3]:
            step = np.zeros_like(pixels)
            step[b].flat[flat] = eps
            fd = (target_log_prob(pg, pixels + step, ids, types, target)
                  - target_log_prob(pg, pixels - step, ids, types, target))[b] / (2 * eps)
            assert abs(fd - grad[b].flat[flat]) <= 2e-3 * scale, (b, flat, fd, grad[b].flat[flat])


def test_integrated_gradients_completeness_improves_with_steps(tiny_models):
    pg = tiny_models["pg2"].pg
    pixels, ids, types, target = attribution_case(pg)
    f_x = target_log_prob(pg, pixels, ids, types, target)
    f_black = target_log_prob(pg, np.full_like(pixels, ins.BLACK), ids, types, target)
    errors = {}
    for steps in (8, 256):
        ig = ins.integrated_gradients(pg, pixels, ids, types, None, target, steps=steps)
        assert ig.attributions.shape == pixels.shape and ig.heatmap.shape == pixels.shape[:3]
        np.testing.assert_allclose(ig.f_pixels, f_x, atol=1e-4)
        np.testing.assert_allclose(ig.f_baseline, f_black, atol=1e-4)
        errors[steps] = np.abs(ig.attributions.sum((1, 2, 3)) - (f_x - f_black))
    # Completeness, sum(attributions) = f(x) - f(black), holds up to the midpoint rule's O(1/steps^2)
    # error. Measured on this tiny random model (f(x) - f(black) = -0.70 and 0.42 for the two
    # rows): errors 0.57 / 0.29 at 8 steps, 0.35 / 0.30 at 16, 0.086 / 0.011 at 64 (the path from
    # black is far from linear), 1.2e-3 / 8.8e-5 at 256.
    assert (errors[256] <= 5e-3).all()
    assert (errors[256] < errors[8] / 100).all()


def test_attributions_run_on_a_bfloat16_model(tiny_models):
    tiny = tiny_models["pg2"]
    pg = PaliGemma.from_pretrained(tiny.hf_dir, dtype="bfloat16")
    pixels, ids, types, target = attribution_case(tiny.pg)
    ig = ins.integrated_gradients(pg, pixels, ids, types, None, target, steps=16)  # summed in float32
    f32 = ins.integrated_gradients(tiny.pg, pixels, ids, types, None, target, steps=16)
    assert ig.attributions.dtype == np.float32 and np.isfinite(ig.attributions).all()
    # bf16 weights and activations round differently, pixel by pixel; the picture stays the
    # float32 one: correlation measured 0.996 (a sign or layout slip would give ~0 or < 0).
    assert np.corrcoef(ig.attributions.ravel(), f32.attributions.ravel())[0, 1] > 0.9
    assert np.isfinite(ins.saliency(pg, pixels, ids, types, None, target)).all()


def test_attributions_refuse_bad_inputs(tiny_models):
    pg = tiny_models["pg1"].pg
    pixels, ids, types, target = attribution_case(pg)
    cases = [
        (dict(target_mask=np.zeros_like(target)), r"marks no token in rows \[0, 1\]"),
        (dict(target_mask=target.astype(int)), "must be bool"),
        (dict(target_mask=target[:, 1:]), "target_mask must be"),
        (dict(target_mask=np.eye(2, ids.shape[1], dtype=bool)), "first position"),
        (dict(attention_mask=~target), "padding"),
    ]
    for change, message in cases:
        args = dict(pixel_values=pixels, input_ids=ids, token_type_ids=types, attention_mask=None, target_mask=target)
        args.update(change)
        with pytest.raises(UserError, match=message):
            ins.saliency(pg, **args)
    for steps in (0, ins.MAX_IG_STEPS + 1):
        with pytest.raises(UserError, match="steps"):
            ins.integrated_gradients(pg, pixels, ids, types, None, target, steps=steps)
    with pytest.raises(UserError, match="does not broadcast"):
        ins.integrated_gradients(pg, pixels, ids, types, None, target, baseline=np.zeros(5))


# ---- token layout and pictures --------------------------------------------------------------------


def test_upsample_puts_a_cell_on_its_pixels_of_a_non_square_image():
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0
    up = ins.upsample(heat, 30, 50)  # cells are 7.5 rows x 12.5 columns; a pixel goes by its centre
    rows, cols = np.nonzero(up)
    assert set(rows) == set(range(7, 15)) and set(cols) == set(range(25, 37))
    assert up.sum() == 8 * 12


def test_token_segments_and_prefix_mask():
    ids = np.array([0, 0, 9, 9, 9, 9, 2, 5, 108, 6, 1])
    types = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    mask = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    segments = ins.token_segments(ids, types, mask, image_token_id=9)
    assert [(s.name, s.start, s.stop) for s in segments] == [
        ("padding", 0, 2), ("image", 2, 6), ("prefix", 6, 9), ("suffix", 9, 11)]
    seen = ins.prefix_lm_mask(types[None], mask[None])[0]
    assert seen[2, 8] and seen[8, 2] and not seen[8, 9] and seen[10, 9] and not seen[9, 10] and not seen[:, :2].any()


def rgb(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_plots_return_figures_that_save_as_pngs(tmp_path):
    image = rgb(30, 50)
    maps = ins.image_attention(hand_attention(), START, P, per_layer=True, per_head=True)  # [2, 3, 4, 4]
    ids = np.array([9] * 16 + [2, 5, 108, 6, 1])
    types = np.array([0] * 19 + [1, 1])
    segments = ins.token_segments(ids, types, None, image_token_id=9)
    rng = np.random.default_rng(1)
    lens = ins.LogitLens(rng.integers(0, 4, (3, 1, 5, 2)), np.sort(rng.random((3, 1, 5, 2)))[..., ::-1], None)
    figures = {
        "overlay": plots.overlay(PIL.Image.fromarray(image), maps[0, 1], title="one"),
        "grid": plots.attention_grid(maps, image, layers=[4, 7]),
        "words": plots.word_maps(image, ["a", "cat", "on", "a", "mat", "!"], list(maps.reshape(-1, G, G)), columns=4),
        "mask": plots.mask_image(ins.prefix_lm_mask(types[None])[0], segments),
        "matrix": plots.attention_matrix(rng.random((21, 21)), segments, log=True),
        "lens": plots.logit_lens_table(lens, ["zero", "one", "two", "three"].__getitem__, positions=[1, 3]),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        width, height = (fig.get_size_inches() * 50).round().astype(int)
        path = plots.save(fig, tmp_path / f"{name}.png", dpi=50)
        with PIL.Image.open(path) as png:
            assert png.format == "PNG" and png.size == (width, height), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in figures)  # no temp files left
    with pytest.raises(UserError, match="cannot write"):
        plots.save(figures["overlay"], tmp_path / "missing" / "overlay.png")
    with pytest.raises(UserError, match="one map per word"):
        plots.word_maps(image, ["a"], [])
    with pytest.raises(UserError, match="segments cover 21"):
        plots.attention_matrix(np.ones((5, 5)), segments)


def test_core_import_does_not_need_matplotlib():
    code = "import sys, pali_jax, pali_jax.inspect; assert 'matplotlib' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_circle_cell_is_the_patch_the_maps_put_there():
    """benchmarks/circle_attention.py scores a map by `circle_cell(scene)`: that must be the patch
    holding the circle's pixels, and attention on that patch's image token must peak there in the
    map (the hit rates themselves are the benchmark's, in docs/performance.md)."""
    from benchmarks.circle_attention import circle_cell
    from pali_jax.demo import shapes

    def off_diagonal_circle(scene) -> bool:  # a transposed grid would put it elsewhere
        return any(x.kind == "circle" and x.cell // G != x.cell % G for x in scene.shapes)

    scene = next(s for s in shapes.scenes(50, 10) if len(s.shapes) == 2 and off_diagonal_circle(s))
    pixels = shapes.render(scene).astype(np.float32)
    grid = shapes.IMAGE_SIZE // G
    drawn = np.abs(pixels - scene.background).max(-1) > 48  # shapes, not the background's noise
    ink = drawn.reshape(G, grid, G, grid).sum(axis=(1, 3)).reshape(-1)  # drawn pixels per patch
    cell = circle_cell(scene)
    other = next(x.cell for x in scene.shapes if x.kind != "circle")
    assert ink[cell] > 0 and set(np.flatnonzero(ink)) <= {cell, other}
    attn = np.zeros((1, 1, 1, START + P + 3), np.float32)  # [L, N, T, S]: one query, all on the circle's token
    attn[..., START + cell] = 1.0
    assert ins.image_attention(attn, START, P).argmax() == cell
