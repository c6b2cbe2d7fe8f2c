"""Beam search over the KV cache: one jitted prefill + `lax.while_loop` over the decode core
(`pali_jax.decode`), like `generate.py`.

Each prompt keeps `beams` hypotheses. A step extends every live hypothesis by every token and
keeps the `beams` best candidates per prompt by length-normalised score, `sum(log p) / len**alpha`
(alpha = `length_penalty`), so finished and running hypotheses compete on the same footing. A
hypothesis that emits a stop token is finished: it then only extends with padding at no cost.
The cache rows are reordered by a gather along the batch axis after every step.

Under a mesh (`pali_jax.sharding`) the prompts, the cache and its B * beams rows are split over
the batch axes, and the hypotheses the host reads are made whole on every device (`decode.placed`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pali_jax import decode
from pali_jax.decode import DecodeStatics, GenerateOutput, jit_model_program
from pali_jax.generation_config import GenerationConfig, GenerationError
from pali_jax.kv_cache import KVCache
from pali_jax.paligemma import PaliGemmaModel


@flax.struct.dataclass
class BeamState:
    step: jax.Array  # [] int32
    tokens: jax.Array  # [B, n, N]
    logprob: jax.Array  # [B, n] summed log-probabilities
    lengths: jax.Array  # [B, n]
    done: jax.Array  # [B, n]
    cache: KVCache  # rows ordered b * n + beam


def _normalised(logprob, lengths, alpha):
    return logprob / jnp.maximum(lengths, 1).astype(jnp.float32) ** alpha


class BeamSearch:
    """Compiled beam search for one model; reuse the instance to reuse its programs."""

    def __init__(self, model: PaliGemmaModel, mesh: Mesh | None = None):
        self.model = model
        self.mesh = mesh  # params placed by pali_jax.sharding on this mesh; None: one device
        self._run = jit_model_program(self._run_impl, model.policy, static_argnums=(0, 1))

    def _select(self, state: BeamState, logits, stop_tokens, alpha) -> BeamState:
        """Extends every hypothesis by every token and keeps the best `n` per prompt."""
        b, n, _ = state.tokens.shape
        pad = self.model.cfg.pad_token_id
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, n, -1)  # [B, n, V]
        vocab = logp.shape[-1]
        # A finished hypothesis continues only with padding, at no cost and no added length.
        finished_row = jnp.full((vocab,), -jnp.inf).at[pad].set(0.0)
        logp = jnp.where(state.done[..., None], finished_row, logp)
        total = state.logprob[..., None] + logp  # [B, n, V]
        lengths = state.lengths[..., None] + (~state.done[..., None])
        score = _normalised(total, lengths, alpha).reshape(b, n * vocab)
        _, flat = jax.lax.top_k(score, n)  # [B, n]
        beam, token = flat // vocab, flat % vocab
        take = lambda x: jnp.take_along_axis(x, beam, axis=1)  # noqa: E731
        was_done = take(state.done)
        tokens = jnp.take_along_axis(state.tokens, beam[..., None], axis=1)
        tokens = jax.lax.dynamic_update_slice(tokens, token[..., None].astype(jnp.int32), (0, 0, state.step))
        rows = (jnp.arange(b)[:, None] * n + beam).reshape(-1)  # [B*n] cache rows to keep
        c = state.cache
        cache = c.map_rows(lambda x, axis: jnp.take(x, rows, axis=axis))
        return decode.placed(BeamState(
            step=state.step + 1,
            tokens=tokens,
            logprob=jnp.take_along_axis(total.reshape(b, -1), flat, axis=1),
            lengths=take(state.lengths) + (~was_done),
            done=was_done | jnp.isin(token, stop_tokens),
            cache=cache,
        ), self.mesh)

    def _run_impl(self, statics: DecodeStatics, beams: int, params, pixels, ids, types, mask, max_new_tokens, stop_tokens, alpha):
        cfg = self.model.cfg
        batch = ids.shape[0]
        logits, cache, _ = decode.prefill(self.model, self.mesh, statics.cache_length, params, pixels, ids, types, mask)
        # Every beam starts from the same prompt: copy the cache, and let only beam 0 compete at
        # the first step so that the n beams do not start as n copies of one hypothesis.
        cache = cache.map_rows(lambda x, axis: jnp.repeat(x, beams, axis=axis))
        start = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)
        state = decode.placed(BeamState(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch, beams, statics.buffer), cfg.pad_token_id, jnp.int32),
            logprob=jnp.broadcast_to(start, (batch, beams)),
            lengths=jnp.zeros((batch, beams), jnp.int32),
            done=jnp.zeros((batch, beams), bool),
            cache=cache,
        ), self.mesh)
        state = self._select(state, jnp.repeat(logits, beams, axis=0), stop_tokens, alpha)

        def body(s: BeamState) -> BeamState:
            last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=2).reshape(-1)  # [B*n]
            step_logits, cache, _ = decode.step(self.model, params, last, s.cache, ~s.done.reshape(-1))
            return self._select(s.replace(cache=cache), step_logits, stop_tokens, alpha)

        # The loop's carried state takes whatever layout XLA picks: make the result readable again.
        return decode.placed(jax.lax.while_loop(
            lambda s: decode.running(s.step, max_new_tokens, s.done, s.cache), body, state
        ), self.mesh)

    def _run_arguments(self, params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config,
                       options) -> tuple[GenerationConfig, tuple]:
        """(options resolved and checked, `_run`'s arguments)."""
        generation = GenerationConfig.resolve(generation_config, options)
        if generation.do_sample:
            raise GenerationError("temperature", "beam search is deterministic: drop temperature / top_k / top_p")
        decode.refuse_records(generation, "{name} is for greedy or sampled decoding, not beam search")
        statics, ids, types, mask, stops = decode.prepare_prompts(
            self.model.cfg, input_ids, token_type_ids, attention_mask, generation, dtype=self.model.dtype,
            mesh=self.mesh,
        )
        return generation, (
            statics, generation.beams, params, pixel_values, ids, types, mask, jnp.int32(generation.max_new_tokens),
            stops, jnp.float32(generation.length_penalty),
        )

    def search(self, params, pixel_values, input_ids, token_type_ids=None, attention_mask=None, *,
               generation_config: GenerationConfig | None = None, **options: Any) -> GenerateOutput:
        """The best of `beams` hypotheses per prompt; `GenerateOutput.scores` holds its normalised
        log-probability. `options` are `GenerationConfig` fields overriding `generation_config`'s
        (beams, max_new_tokens, length_penalty, stop_tokens, cache_length; sampling is refused)."""
        generation, arguments = self._run_arguments(
            params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config, options
        )
        alpha = generation.length_penalty
        state = self._run(*arguments)
        score = np.asarray(_normalised(state.logprob, state.lengths, alpha))
        best = score.argmax(axis=1)
        rows = np.arange(len(best))
        lengths = np.asarray(state.lengths)[rows, best]
        done = np.asarray(state.done)[rows, best]
        n = int(lengths.max())
        tokens = np.asarray(state.tokens)[rows, best, :n]
        return GenerateOutput(
            tokens, lengths, decode.stop_reasons(done, lengths, generation.max_new_tokens), scores=score[rows, best]
        )

    def compile(self, params, pixel_values, input_ids, token_type_ids=None, attention_mask=None, *,
                generation_config: GenerationConfig | None = None, **options: Any) -> None:
        """Compiles the program `search` runs for these arguments, without running it (`params` and
        `pixel_values` may be `jax.ShapeDtypeStruct`s, as in `Generator.compile`)."""
        _, arguments = self._run_arguments(
            params, pixel_values, input_ids, token_type_ids, attention_mask, generation_config, options
        )
        self._run.lower(*arguments).compile()
