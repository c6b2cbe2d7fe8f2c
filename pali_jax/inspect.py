"""Looking inside the model, in numbers: attention over the image, attention rollout, the logit
lens, and pixel attributions (saliency, integrated gradients). Pictures of these are `plots.py`.

Shapes: L decoder layers, N heads, T tokens (queries Q, keys S), P = g * g image tokens in the
row-major order of SigLIP's patch convolution, D width, V vocabulary, B batch, H x W pixels.
Attention arrays are post-softmax probabilities as the model's forward returns them: one
`[B, N, T, T]` array per layer, or `[n_new, L, N, S]` per row during generation.

Attributions score the log-probability of target tokens: `target_mask[b, t]` marks positions whose
token is scored, by the logits at t - 1 (the token at t is predicted one position earlier), which
is how a suffix is scored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pali_jax.errors import UserError
from pali_jax.decode import jit_model_program
from pali_jax.masks import PrefixLM
from pali_jax.paligemma import PaliGemmaModel

if TYPE_CHECKING:
    from pali_jax.pretrained import PaliGemma

Index = int | Sequence[int] | None  # layers / heads / query rows: one, several, or None (all)
MAX_IG_STEPS = 1024  # the midpoint rule has long converged by then (1e-3 of f at 256 steps in the tests)
BLACK = -1.0  # a black pixel in the model's [-1, 1] pixel space ((0 / 255 - 0.5) / 0.5)


# ---- attention ------------------------------------------------------------------------------------


def _pick(name: str, index: Index, size: int) -> np.ndarray:
    """Indices along an axis of `size` (negative ones count from the end), refused when out of range."""
    picked = np.arange(size) if index is None else np.atleast_1d(np.asarray(index))
    if picked.size == 0 or picked.ndim != 1 or not np.issubdtype(picked.dtype, np.integer):
        raise UserError(f"{name} must be an int or a non-empty sequence of ints, got {index!r}")
    if (picked < -size).any() or (picked >= size).any():
        raise UserError(f"{name} {picked.tolist()} out of range for {size} {name}")
    return picked % size


def grid_size(num_image_tokens: int) -> int:
    """g with g * g = num_image_tokens (the image is a square grid of patches)."""
    g = math.isqrt(max(int(num_image_tokens), 0))
    if num_image_tokens < 1 or g * g != num_image_tokens:
        raise UserError(f"num_image_tokens must be a positive square (g * g patches), got {num_image_tokens}")
    return g


def image_attention(
    attn,
    image_start: int,
    num_image_tokens: int,
    *,
    layers: Index = None,
    heads: Index = None,
    queries: Index = None,
    reduce: Literal["mean", "max"] = "mean",
    per_layer: bool = False,
    per_head: bool = False,
    normalize: bool = False,
) -> np.ndarray:
    """Attention paid to the image patches, as maps over the patch grid.

    attn: [L, N, Q, S] post-softmax probabilities (one or more query rows), or [L, N, S] (one
    generated token's row). The image occupies keys image_start .. image_start + P - 1.
    layers / heads / queries: which to use (int, sequence, or None for all; negative ints count
    from the end). The chosen query rows are always averaged; layers and heads are reduced by
    `reduce` ("mean" or "max") unless `per_layer` / `per_head` keeps that axis.
    normalize: each (layer, head, query) row rescaled to sum to 1 over the image keys, i.e. the
    fraction of that row's image attention, so that layers that mostly attend to text still show
    where on the image they look. Rows with no image attention stay zero.

    Returns float32 [g, g]; [L', g, g] with per_layer; [N', g, g] with per_head; [L', N', g, g]
    with both (L', N': the chosen layers and heads, in the order given).

    Generation's attentions [n_new, L, N, S]: pass `gen[k]` for new token k, or a word of tokens
    a .. b - 1 as `gen[a:b].transpose(1, 2, 0, 3)` ([L, N, b - a, S]: its rows are averaged).
    """
    a = np.asarray(attn)
    if a.ndim == 3:
        a = a[:, :, None, :]
    if a.ndim != 4:
        raise UserError(f"attention must be [L, N, Q, S] or [L, N, S], got shape {list(np.shape(attn))}")
    if reduce not in ("mean", "max"):
        raise UserError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    g = grid_size(num_image_tokens)
    n_layers, n_heads, n_queries, n_keys = a.shape
    if image_start < 0 or image_start + num_image_tokens > n_keys:
        raise UserError(f"image tokens {image_start}..{image_start + num_image_tokens - 1} do not fit {n_keys} keys")
    ls, hs, qs = _pick("layers", layers, n_layers), _pick("heads", heads, n_heads), _pick("queries", queries, n_queries)
    # Select before converting: a whole forward's attention in float64 would be most of the memory.
    a = a[ls][:, hs][:, :, qs, image_start:image_start + num_image_tokens].astype(np.float64)  # [L', N', Q', P]
    if normalize:
        total = a.sum(axis=-1, keepdims=True)
        a = np.divide(a, total, out=np.zeros_like(a), where=total > 0)
    a = a.mean(axis=2)  # [L', N', P]
    reducer = np.mean if reduce == "mean" else np.max
    if not per_head:
        a = reducer(a, axis=1, keepdims=True)
    if not per_layer:
        a = reducer(a, axis=0, keepdims=True)
    maps = a.reshape(a.shape[0], a.shape[1], g, g).astype(np.float32)  # row-major patches, as SigLIP's conv
    if per_layer and per_head:
        return maps
    if per_layer:
        return maps[:, 0]
    if per_head:
        return maps[0]
    return maps[0, 0]


def answer_words(pieces: Sequence[str]) -> list[tuple[str, slice]]:
    """Generated tokens' texts (one piece per token, as `tokenizer.decode([id])` gives them)
    grouped into words: a word starts at a piece led by whitespace, and each `<loc>` / `<seg>`
    token is a word of its own; pieces with no text (`<eos>`) belong to none. Returns
    (the word's text, its tokens' slice)."""
    special = lambda text: text.startswith(("<loc", "<seg"))  # noqa: E731
    words: list[tuple[str, slice]] = []
    for k, piece in enumerate(pieces):
        if not piece:
            continue
        continues = words and words[-1][1].stop == k and not piece[0].isspace()
        if continues and not special(piece) and not special(words[-1][0]):
            text, span = words[-1]
            words[-1] = (text + piece, slice(span.start, k + 1))
        else:
            words.append((piece.strip(), slice(k, k + 1)))
    return words


def word_attention_maps(attentions, pieces: Sequence[str], num_image_tokens: int) -> tuple[list[str], np.ndarray]:
    """Each generated word's attention over the image: (words, maps [W, g, g]).

    attentions: a `Result`'s [n, L, N, S] (the image tokens at positions 0 .. P - 1); pieces: the
    n tokens' texts. A word's map is its tokens' rows averaged (the passes that produced them), over
    every layer and head.
    """
    a = np.asarray(attentions)
    if a.ndim != 4 or a.shape[0] != len(pieces):
        raise UserError(f"attentions must be [n, L, N, S] with n = {len(pieces)} tokens, got {list(a.shape)}")
    words = answer_words(pieces)
    g = grid_size(num_image_tokens)
    maps = [image_attention(a[span].transpose(1, 2, 0, 3), 0, num_image_tokens) for _, span in words]
    return [w for w, _ in words], np.stack(maps) if maps else np.zeros((0, g, g), np.float32)


def attention_rollout(attentions, *, residual: float = 0.5) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): how much each token's last-layer state draws on
    each input token, through all layers.

    attentions: one [N, T, T] array per layer (or an [L, N, T, T] array), the square post-softmax
    attentions of a full forward over the whole sequence; a decode step's [N, 1, S] rows are not
    enough, because rollout chains every position's attention through the layers below.
    Per layer: A = residual * I + (1 - residual) * mean over heads, rows renormalised to 1 (the
    identity stands for the residual connection); rollout = A_L @ ... @ A_2 @ A_1.

    Returns float32 [T, T]: row i (query), column j (input token).
    """
    layers = [jnp.asarray(a, jnp.float32) for a in attentions]
    if not layers:
        raise UserError("attention_rollout needs at least one layer's attention")
    shape = layers[0].shape
    if len(shape) != 3 or shape[1] != shape[2]:
        raise UserError(f"each layer's attention must be square [N, T, T], got {list(shape)}")
    if any(a.shape != shape for a in layers):
        raise UserError(f"every layer's attention must have shape {list(shape)}, got {[list(a.shape) for a in layers]}")
    if not 0.0 <= residual <= 1.0:
        raise UserError(f"residual must lie in [0, 1], got {residual}")
    # On the default device: L products of [T, T] matrices (T ~ 4100 at 896 px) take minutes in
    # numpy on a CPU. HIGHEST precision: a GPU's or TPU's default float32 matmul rounds its inputs
    # (TF32 / bf16 passes).
    eye = jnp.eye(shape[1], dtype=jnp.float32)
    rollout = eye
    for a in layers:
        mixed = residual * eye + (1.0 - residual) * a.mean(axis=0)  # [T, T]
        total = mixed.sum(axis=-1, keepdims=True)
        mixed = jnp.where(total > 0, mixed / jnp.where(total > 0, total, 1.0), 0.0)  # a fully masked row stays 0
        rollout = jnp.matmul(mixed, rollout, precision=jax.lax.Precision.HIGHEST)
    return np.asarray(rollout)


# ---- token layout ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of positions start .. stop - 1 of one kind: "image", "prefix" (`<bos>`, prompt and
    "\\n", token type 0), "suffix" (type 1) or "padding"."""

    name: str
    start: int
    stop: int


def token_segments(input_ids, token_type_ids, attention_mask, image_token_id: int) -> tuple[Segment, ...]:
    """The runs of image / prefix / suffix / padding positions of one row ([T] arrays; attention_mask
    may be None: no padding), in order."""
    ids = np.asarray(input_ids)
    types = np.asarray(token_type_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if ids.ndim != 1 or types.shape != ids.shape or mask.shape != ids.shape:
        raise UserError(f"token_segments takes one row: [T] arrays, got {ids.shape}, {types.shape}, {mask.shape}")
    text = np.where(types == 0, "prefix", "suffix")
    kinds = np.where(~mask, "padding", np.where(ids == image_token_id, "image", text))
    starts = [0] + [t for t in range(1, len(kinds)) if kinds[t] != kinds[t - 1]]
    return tuple(Segment(str(kinds[s]), s, e) for s, e in zip(starts, starts[1:] + [len(kinds)]))


def prefix_lm_mask(token_type_ids, attention_mask=None) -> np.ndarray:
    """[B, T, T] bool: which keys each query sees in a full forward (the model's own rule, `masks.PrefixLM`)."""
    types = jnp.asarray(token_type_ids)
    if types.ndim != 2:
        raise UserError(f"token_type_ids must be [B, T], got shape {list(types.shape)}")
    valid = jnp.ones(types.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    if valid.shape != types.shape:
        raise UserError(f"attention_mask must be {list(types.shape)}, got {list(valid.shape)}")
    prefix = types == 0
    return np.asarray(PrefixLM(jnp.arange(types.shape[1]), prefix, prefix, valid).mask())


def upsample(heat, height: int, width: int) -> np.ndarray:
    """A [h, w] map (e.g. the [g, g] patch grid) as [height, width], nearest cell per pixel.

    The processor stretches the whole image to a square, so cell (i, j) covers rows
    i * height / h .. (i + 1) * height / h and columns j * width / w .. of the original image; a
    pixel belongs to the cell its centre falls in.
    """
    heat = np.asarray(heat)
    if heat.ndim != 2 or min(heat.shape) < 1 or height < 1 or width < 1:
        raise UserError(f"upsample takes a [h, w] map to a positive size, got {list(heat.shape)} -> {height}x{width}")
    rows = np.floor((np.arange(height) + 0.5) * heat.shape[0] / height).astype(int)
    cols = np.floor((np.arange(width) + 0.5) * heat.shape[1] / width).astype(int)
    return heat[rows[:, None], cols[None, :]]


# ---- logit lens -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """Each hidden state read out as next-token probabilities (nostalgebraist 2020).

    Index 0 is the input embeddings, l the output of layer l, the last one the model's output.
    """

    top_ids: np.ndarray  # [L+1, B, T, k] int32, most probable first
    top_probs: np.ndarray  # [L+1, B, T, k] float32
    token_probs: np.ndarray | None  # [L+1, B, T] float32: probability of the given token_ids, if given


@functools.cache
def _lens_program(module: PaliGemmaModel, top_k: int):
    """One jitted program per model (modules hash by their config) and k: repeated calls reuse it."""

    def read_out(m, h, final):  # h [B, T, D]; the last state is already final-normed: norm it once
        return m.llm.logits(jnp.where(final, h, m.llm.final_norm(h)))

    def run(params, hidden, token_ids):  # hidden [L+1, B, T, D]
        final = jnp.arange(hidden.shape[0]) == hidden.shape[0] - 1

        def layer(args):  # one layer at a time: [L+1, B, T, V] probabilities would not fit a real model
            probs = jax.nn.softmax(module.apply({"params": params}, *args, method=read_out), axis=-1)  # [B, T, V]
            top_probs, top_ids = jax.lax.top_k(probs, top_k)
            token = None if token_ids is None else jnp.take_along_axis(probs, token_ids[..., None], -1)[..., 0]
            return top_ids, top_probs, token

        return jax.lax.map(layer, (hidden, final))

    return jit_model_program(run, module.policy)


def logit_lens(pg: "PaliGemma", hidden_states, *, top_k: int = 5, token_ids=None) -> LogitLens:
    """Every hidden state through the decoder's final norm and tied embedding (the model's own
    `llm.logits`, Gemma 2's final soft cap included), then softmax.

    hidden_states: L+1 arrays [B, T, D] as transformers defines them for Gemma: the scaled input
    embeddings, each layer's output, and last the last layer's output AFTER the final norm (so it
    is not normed again: its read-out is exactly the model's logits). token_ids [B, T]: also return
    each layer's probability of these tokens (e.g. the tokens at t + 1, to see when the answer forms).
    """
    states = [jnp.asarray(h) for h in hidden_states]
    depth, width = pg.config.text.depth, pg.config.text.width
    if len(states) != depth + 1:
        raise UserError(f"hidden_states must hold {depth + 1} arrays (embeddings + {depth} layers), got {len(states)}")
    shape = states[0].shape
    if len(shape) != 3 or shape[2] != width or any(h.shape != shape for h in states):
        shapes = [list(h.shape) for h in states]
        raise UserError(f"every hidden state must be [B, T, {width}] of one shape, got {shapes}")
    if not 1 <= top_k <= pg.config.vocab_size:
        raise UserError(f"top_k must lie in [1, {pg.config.vocab_size}], got {top_k}")
    if token_ids is not None:
        token_ids = jnp.asarray(token_ids, jnp.int32)
        if token_ids.shape != shape[:2]:
            raise UserError(f"token_ids must be {list(shape[:2])}, got {list(token_ids.shape)}")
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= pg.config.vocab_size:
            raise UserError(f"token_ids must lie in [0, {pg.config.vocab_size})")
    top_ids, top_probs, token = _lens_program(pg.module, top_k)(pg.params, jnp.stack(states), token_ids)
    return LogitLens(np.asarray(top_ids), np.asarray(top_probs), None if token is None else np.asarray(token))


# ---- pixel attributions ---------------------------------------------------------------------------


def _target_log_prob(module: PaliGemmaModel, params, pixels, ids, types, mask, target) -> jax.Array:
    """[B]: summed log-probability of the target tokens, each scored by the logits one position earlier."""
    logits = module.apply({"params": params}, pixels, ids, types, mask)  # [B, T, V]
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    # Untargeted positions read id 0: an `<image>` id may lie past the table (big_vision checkpoints).
    scored_ids = jnp.where(target[:, 1:], ids[:, 1:], 0)
    scored = jnp.take_along_axis(log_probs, scored_ids[..., None], axis=-1)[..., 0]  # [B, T-1]: token t+1 by logits t
    return jnp.sum(jnp.where(target[:, 1:], scored, 0.0), axis=-1)


def _pixel_grad(module, params, pixels, ids, types, mask, target) -> jax.Array:
    """[B, H, W, 3]: d(row b's target log-prob) / d(row b's pixels). Rows do not interact, so the
    gradient of the batch's sum is every row's own gradient."""
    objective = lambda x: jnp.sum(_target_log_prob(module, params, x, ids, types, mask, target))  # noqa: E731
    return jax.grad(objective)(pixels)


@functools.cache
def _saliency_program(module: PaliGemmaModel):
    return jit_model_program(functools.partial(_pixel_grad, module), module.policy)


@functools.cache
def _ig_program(module: PaliGemmaModel, steps: int):
    def run(params, pixels, baseline, ids, types, mask, target):
        # Riemann midpoint rule over the straight path baseline -> pixels; a scan keeps one
        # forward + backward in memory whatever the number of steps.
        def add(total, alpha):  # summed in float32 whatever the model's dtype
            point = (baseline + alpha * (pixels - baseline)).astype(pixels.dtype)
            return total + _pixel_grad(module, params, point, ids, types, mask, target).astype(jnp.float32), None

        alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
        total, _ = jax.lax.scan(add, jnp.zeros(pixels.shape, jnp.float32), alphas)
        f = lambda x: _target_log_prob(module, params, x, ids, types, mask, target)  # noqa: E731
        return (pixels - baseline) * total / steps, f(pixels), f(baseline)

    return jit_model_program(run, module.policy)


PixelReduce = Literal["max", "sum"] | None


def pixel_map(grad, reduce: PixelReduce) -> np.ndarray:
    """[B, H, W, 3] -> [B, H, W]: "max" of |channel| (Simonyan et al. 2013), "sum" of |channel|;
    None keeps the channels."""
    grad = np.asarray(grad)
    if reduce is None:
        return grad
    if reduce == "max":
        return np.abs(grad).max(axis=-1)
    if reduce == "sum":
        return np.abs(grad).sum(axis=-1)
    raise UserError(f"reduce must be 'max', 'sum' or None, got {reduce!r}")


def _attribution_inputs(pg: "PaliGemma", pixel_values, input_ids, token_type_ids, attention_mask, target_mask):
    """Checked device arrays (pixels, ids, types, mask, target) for the attribution programs."""
    pixels, ids, types, mask = pg._check(pixel_values, input_ids, token_type_ids, attention_mask)
    types = np.zeros(ids.shape, np.int32) if types is None else types
    mask = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    target = np.asarray(target_mask)
    if target.shape != ids.shape:
        raise UserError(f"target_mask must be {list(ids.shape)} like input_ids, got {list(target.shape)}")
    if target.dtype != bool:
        raise UserError(f"target_mask must be bool, got {target.dtype}")
    if not target.any(axis=1).all():
        raise UserError(f"target_mask marks no token in rows {np.flatnonzero(~target.any(axis=1)).tolist()}")
    if target[:, 0].any():
        raise UserError("target_mask[:, 0] must be False: no logits predict the first position")
    if (target & ~mask).any():
        raise UserError("target_mask marks padding positions (attention_mask 0)")
    return tuple(jnp.asarray(x) for x in (pixels, ids, types, mask, target))


def saliency(pg: "PaliGemma", pixel_values, input_ids, token_type_ids, attention_mask, target_mask, *,
             reduce: PixelReduce = "max") -> np.ndarray:
    """Gradient saliency: d(summed log-probability of the target tokens) / d(pixels), one jitted call.

    pixel_values [B, H, W, 3] in [-1, 1]; input_ids, token_type_ids, attention_mask (None: no
    padding), target_mask [B, T] bool (see module docstring; at least one target per row).
    Returns [B, H, W]: the largest |gradient| over the three channels ("max", the default), their
    sum ("sum"), or the raw gradient [B, H, W, 3] (reduce=None).
    """
    inputs = _attribution_inputs(pg, pixel_values, input_ids, token_type_ids, attention_mask, target_mask)
    return pixel_map(_saliency_program(pg.module)(pg.params, *inputs), reduce)


@dataclasses.dataclass(frozen=True)
class Attributions:
    """Integrated gradients. Completeness: attributions.sum((1, 2, 3)) ~ f_pixels - f_baseline, up to
    the Riemann sum's error (it shrinks as steps grow)."""

    attributions: np.ndarray  # [B, H, W, 3]: (pixels - baseline) * mean gradient along the path
    heatmap: np.ndarray  # [B, H, W]: sum over channels of |attributions|
    f_pixels: np.ndarray  # [B]: target log-probability at the pixels
    f_baseline: np.ndarray  # [B]: ... at the baseline


def integrated_gradients(pg: "PaliGemma", pixel_values, input_ids, token_type_ids, attention_mask, target_mask, *,
                         steps: int = 32, baseline=None) -> Attributions:
    """Integrated gradients (Sundararajan et al. 2017) of the target tokens' summed log-probability.

    Inputs as `saliency`. baseline: None is a black image, -1.0 in the model's [-1, 1] pixel
    space; else a number or an array broadcastable to pixel_values. The path integral is the
    midpoint rule with `steps` points (1 .. MAX_IG_STEPS), all in one jitted call.
    """
    if not isinstance(steps, int) or not 1 <= steps <= MAX_IG_STEPS:
        raise UserError(f"steps must lie in [1, {MAX_IG_STEPS}], got {steps}")
    pixels, *rest = _attribution_inputs(pg, pixel_values, input_ids, token_type_ids, attention_mask, target_mask)
    base = np.asarray(BLACK if baseline is None else baseline, np.float32)
    try:
        base = jnp.asarray(np.broadcast_to(base, pixels.shape), pixels.dtype)
    except ValueError:
        raise UserError(f"baseline of shape {list(base.shape)} does not broadcast to {list(pixels.shape)}") from None
    attributions, f_pixels, f_baseline = _ig_program(pg.module, steps)(pg.params, pixels, base, *rest)
    return Attributions(np.asarray(attributions), pixel_map(attributions, "sum"), np.asarray(f_pixels),
                        np.asarray(f_baseline))
