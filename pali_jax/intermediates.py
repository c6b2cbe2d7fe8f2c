"""What the model records when asked: attention probabilities and hidden states (Flax `sow`).

The modules sow into the `INTERMEDIATES` collection, which stays empty (and costs nothing) unless
a caller makes it mutable: `model.apply(..., mutable=[INTERMEDIATES])`. The decoder's attention
then takes the path that forms the whole [B, N, T, S] probability matrix instead of a fused or
chunked kernel. What is recorded, by path in the collection:

    image_features                              [B, P, D]  the projector's output
    img/embeddings                              [B, P, Dv] patch + position embeddings
    img/Transformer/encoderblock/output         [Lv, B, P, Dv] (the blocks run under nn.scan)
    img/Transformer/encoderblock/MultiHeadDotProductAttention_0/attention   [Lv, B, Nv, P, P]
    llm/embeddings                              [B, T, D]  the decoder's input
    llm/last_hidden_state                       [B, T, D]  the last layer's output after the final norm
    llm/layers/output, llm/layers/attn/attention            [L, ...] stacked layout, or
    llm/layers_<i>/output, llm/layers_<i>/attn/attention    one per layer: [B, T, D], [B, N, T, S]

`forward_output` turns that into transformers' conventions (`ForwardOutput`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

INTERMEDIATES = "intermediates"

Recorded = dict[str, Any]  # the INTERMEDIATES collection returned by `apply`


@flax.struct.dataclass
class ForwardOutput:
    """A forward pass with what it computed on the way, each as transformers returns it.

    logits [B, T, V] float32.
    attentions: one [B, N, T, T] float32 array per decoder layer, post-softmax (a padding query's
        row, which sees nothing, is uniform; transformers' holds other values there).
    hidden_states: L + 1 arrays [B, T, D]: the decoder's input embeddings (image tokens unscaled,
        text scaled by sqrt(D)), then each layer's output, the last one after the final norm.
    vision_attentions: one [B, Nv, P, P] per SigLIP layer; vision_hidden_states: Lv + 1 arrays
        [B, P, Dv], the patch + position embeddings then each layer's output (before SigLIP's final
        LayerNorm, as transformers' vision tower returns them); image_features [B, P, D]: the
        projector's output, the image tokens the decoder reads.
    attentions / vision_attentions are None unless asked for, hidden_states / vision_hidden_states
    likewise; image_features always come.
    """

    logits: jax.Array
    attentions: tuple[jax.Array, ...] | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    vision_attentions: tuple[jax.Array, ...] | None = None
    vision_hidden_states: tuple[jax.Array, ...] | None = None
    image_features: jax.Array | None = None


def _value(recorded: Recorded, *path: str) -> jax.Array:
    node = recorded
    for key in path:
        node = node[key]
    (value,) = node  # `sow` appends to a tuple; each module records once per call
    return value


def _per_layer(recorded: Recorded, name: str, *path: str) -> list[jax.Array]:
    """A recorded value of every decoder layer, in layer order, whichever layout ran."""
    llm = recorded["llm"]
    if "layers" in llm:
        return list(_value(llm, "layers", *path, name))
    depth = len([k for k in llm if k.startswith("layers_")])
    return [_value(llm, f"layers_{i}", *path, name) for i in range(depth)]


def apply_recording(module, variables, *args, record: bool, **kwargs) -> tuple[Any, jax.Array | None]:
    """`module.apply(variables, *args, **kwargs)`'s output and, when `record`, every decoder layer's
    attention probabilities [L, B, N, T, S] (else None: the plain program, nothing recorded)."""
    if not record:
        return module.apply(variables, *args, **kwargs), None
    out, recorded = module.apply(variables, *args, mutable=[INTERMEDIATES], **kwargs)
    return out, jnp.stack(_per_layer(recorded[INTERMEDIATES], "attention", "attn"))


def forward_output(logits: jax.Array, recorded: Recorded, *, attentions: bool, hidden_states: bool) -> ForwardOutput:
    """`ForwardOutput` from a forward pass's logits and its recorded intermediates."""
    out = ForwardOutput(logits, image_features=_value(recorded, "image_features"))
    block = ("img", "Transformer", "encoderblock")
    if attentions:
        vision = _value(recorded, *block, "MultiHeadDotProductAttention_0", "attention")
        out = out.replace(attentions=tuple(_per_layer(recorded, "attention", "attn")), vision_attentions=tuple(vision))
    if hidden_states:
        layers = _per_layer(recorded, "output")[:-1]  # the last is given after the final norm
        last = _value(recorded, "llm", "last_hidden_state")
        vision = _value(recorded, *block, "output")
        out = out.replace(
            hidden_states=(_value(recorded, "llm", "embeddings"), *layers, last),
            vision_hidden_states=(_value(recorded, "img", "embeddings"), *vision),
        )
    return out
