"""Training: loss and gradients against transformers, freezing, mixed precision, LoRA, accumulation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration

import hf_models
from parity import assert_parity, errors
from pali_jax.weights.hf import target
from pali_jax import lora, quantize
from pali_jax.pretrained import PaliGemma
from pali_jax.errors import UserError
from pali_jax.train import Trainer, TrainConfig, TrainConfigError, suffix_nll
from test_paligemma import make_inputs


def batch_of(pg, batch: int = 2, n_prefix: int = 4, n_suffix: int = 6, seed: int = 3) -> dict[str, np.ndarray]:
    pixels, ids, types = make_inputs(pg, batch, n_prefix, n_suffix, seed=seed)
    return dict(pixel_values=pixels, input_ids=ids, token_type_ids=types, attention_mask=np.ones_like(ids),
                loss_mask=types == 1)


def hf_loss_and_grads(model, b) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' loss (labels -100 on the prefix: token mean) and its gradient per tensor."""
    model.zero_grad()
    out = model(
        pixel_values=torch.tensor(b["pixel_values"]).permute(0, 3, 1, 2),
        input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
        token_type_ids=torch.tensor(b["token_type_ids"], dtype=torch.long),
        attention_mask=torch.tensor(b["attention_mask"], dtype=torch.long),
        labels=torch.tensor(np.where(b["loss_mask"], b["input_ids"], -100), dtype=torch.long),
    )
    out.loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    model.zero_grad()
    return float(out.loss.detach()), grads


@pytest.fixture(scope="module")
def plain_models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, PaliGemma]]:
    """The tiny PaliGemma 1 and 2 configs of hf_models with plain random weights.

    The shared fixtures boost the decoder norms (for non-trivial greedy decoding), which makes
    attention so peaked that float32 rounding alone moves some gradients by 2e-5 (transformers in
    float32 against itself in float64); with plain weights that noise is about 1e-6.
    """
    out = {}
    for seed, kind in enumerate(("pg1", "pg2")):
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(hf_models.tiny_config(kind)).eval()
        model.set_attn_implementation("eager")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # no zero norms or biases: a dropped term must show
        out[kind] = model, PaliGemma.from_pretrained(hf_models.save(model, tmp_path_factory.mktemp(kind)))
    return out


@pytest.mark.parametrize("kind, remat", [("pg1", False), ("pg2", True)])
def test_loss_and_grads_match_transformers(plain_models, kind, remat):
    hf, pg = plain_models[kind]
    b = batch_of(pg)
    b["loss_mask"][1, -2:] = False  # rows with different target counts: the token mean weighs tokens
    ref_loss, ref_grads = hf_loss_and_grads(hf, b)
    trainer = Trainer(pg.config, TrainConfig(reduction="token", remat=remat))  # remat: same numbers
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss))({"params": pg.checkpoint_params()}, b)
    assert_parity(loss, ref_loss, what="loss")  # the bound on gradients is relative
    # HF gradients in our layout: the converter's re-layouts are linear, so they apply to gradients.
    expected = jax.tree.map(lambda x: np.full(x.shape, np.nan), grads["params"])
    for name, grad in ref_grads.items():
        found = target(name, pg.config)
        if found is not None:
            path, index, transform = found
            leaf = expected
            for key in path:
                leaf = leaf[key]
            leaf[index] = transform(grad)
    flat_ours = jax.tree_util.tree_flatten_with_path(grads["params"])[0]
    flat_ref = jax.tree.leaves(expected)
    assert len(flat_ours) == len(flat_ref)
    for (path, ours), ref in zip(flat_ours, flat_ref):
        name = jax.tree_util.keystr(path)
        assert not np.isnan(ref).any(), f"no HF gradient for {name}"
        if "['key']['bias']" in name:
            # Exactly zero in exact arithmetic (a key bias shifts a whole row of attention logits,
            # which softmax ignores): both sides hold rounding noise only.
            assert np.abs(ours).max() <= 1e-6 and np.abs(ref).max() <= 1e-6, name
            continue
        assert_parity(ours, ref, what=name)


def test_example_reduction_and_label_smoothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 7))
    mask = np.zeros((3, 7), bool)
    mask[0, 3:] = True
    mask[1, 5:] = True  # row 2 has no target: it must not count
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:]
    per_row = [nll[r][m[r]].mean() for r in (0, 1)]
    assert float(suffix_nll(logits, ids, mask)) == pytest.approx(np.mean(per_row), rel=1e-6)
    assert float(suffix_nll(logits, ids, mask, "token")) == pytest.approx(nll[m].mean(), rel=1e-6)
    smoothed = 0.9 * nll - 0.1 * np.asarray(logp).mean(-1)
    assert float(suffix_nll(logits, ids, mask, "token", 0.1)) == pytest.approx(smoothed[m].mean(), rel=1e-6)


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# Google's colab recipe: SGD on the LLM attention weights, the rest frozen in half precision.
COLAB = TrainConfig(trainable="attn", optimizer="sgd", learning_rate=0.1, frozen_dtype="bfloat16", batch_size=4)


def test_attn_preset_freezes_the_rest_in_bfloat16(tiny_models):
    pg = tiny_models["pg1"].pg
    trainer = Trainer(pg.config, COLAB)
    state = trainer.init_state(pg.params)
    before = _leaves(state.variables)
    for _ in range(2):
        state, metrics = trainer.step(state, batch_of(pg, batch=4))
    assert np.isfinite(float(metrics["loss"]))
    after = _leaves(state.variables)
    for name, old in before.items():
        trained = "['llm']['layers']['attn']" in name
        assert after[name].dtype == (np.float32 if trained else jnp.bfloat16), name
        assert np.array_equal(after[name], old) != trained, name
    # The optimizer keeps nothing for frozen weights (SGD without momentum keeps nothing at all).
    assert all(x.size <= 1 for x in jax.tree.leaves(state.opt_state))


def test_lora_trains_adapters_only_and_merges_exactly(tiny_models):
    pg = tiny_models["pg2"].pg
    trainer = Trainer(pg.config, TrainConfig(trainable="lora", lora_rank=4, learning_rate=1e-2, batch_size=2))
    state = trainer.init_state(pg.params)
    b = batch_of(pg, seed=5)
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, b)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    params = pg.checkpoint_params()
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(state.variables["params"]), jax.tree.leaves(params)))
    assert set(state.variables["lora"]["llm"]["layers"]) == {"attn", "mlp"}
    forward = jax.jit(trainer.model.apply)
    inputs = (b["pixel_values"], b["input_ids"], b["token_type_ids"])
    applied = forward(state.variables, *inputs)
    merged = forward({"params": trainer.inference_params(state)}, *inputs)
    assert_parity(merged, applied, what="merged adapters")
    assert errors(forward({"params": params}, *inputs), applied)[0] > 1e-3  # the adapters did something


def test_loss_skips_the_image_positions_logits_only(tiny_models):
    """The trainer asks for no logits of the image positions (the traced loss holds none of
    [B, T, V]) and gets the loss of every position's logits (`suffix_nll`), rows padded on either
    side; a target among the image positions is refused."""
    pg = tiny_models["pg2"].pg
    b, pad = batch_of(pg, batch=3, n_suffix=5), 2
    for key in ("input_ids", "token_type_ids", "attention_mask", "loss_mask"):
        x = b[key]
        b[key] = np.zeros((3, x.shape[1] + pad), x.dtype)
        b[key][0, :-pad], b[key][1:, pad:] = x[0], x[1:]  # row 0 padded on the right, rows 1 and 2 on the left
    trainer = Trainer(pg.config, TrainConfig(reduction="token"))
    variables = {"params": pg.checkpoint_params()}
    logits = trainer.model.apply(variables, b["pixel_values"], b["input_ids"], b["token_type_ids"], b["attention_mask"])
    whole = suffix_nll(logits, b["input_ids"], b["loss_mask"], "token")
    assert float(trainer.loss(variables, b)) == pytest.approx(float(whole), rel=1e-6)
    (_, t, v), p = logits.shape, pg.config.num_image_tokens
    traced = str(jax.make_jaxpr(trainer.loss)(variables, b))
    assert f"[3,{t},{v}]" not in traced and f"[3,{t - p},{v}]" in traced
    trainer.place_batch(b)
    b["loss_mask"][1, p] = True
    with pytest.raises(UserError, match="loss_mask marks a target among a row's first"):
        trainer.place_batch(b)


def test_gradient_accumulation_equals_one_big_batch(tiny_models):
    pg = tiny_models["pg1"].pg
    b = batch_of(pg, batch=4, n_suffix=5)
    b["loss_mask"][1, -2:] = False  # unequal suffix lengths: the example mean must still be exact
    results = []
    for config in (COLAB, dataclasses.replace(COLAB, accum_steps=2)):
        trainer = Trainer(pg.config, config)
        state, metrics = trainer.step(trainer.init_state(pg.params), b)
        results.append((state, float(metrics["loss"])))
    (one, loss_one), (two, loss_two) = results
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    for x, y in zip(jax.tree.leaves(one.variables), jax.tree.leaves(two.variables)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-5, atol=1e-7)


def test_merge_covers_every_adapted_weight(tiny_models):
    pg = tiny_models["pg1"].pg
    params, model = pg.checkpoint_params(), Trainer(pg.config, TrainConfig()).model
    adapters = lora.init(model, params, 2, jax.random.PRNGKey(0))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B = 0 would merge to the same weights
    merged = lora.merge(model, params, adapters)
    original = _leaves(params)
    changed = {k for k, v in _leaves(merged).items() if not np.array_equal(v, original[k])}
    assert changed == {f"['llm']['layers']['{m}']['{n}']" for m, names in
                       {"attn": ("q_einsum", "kv_einsum", "attn_vec_einsum"), "mlp": ("gating_einsum", "linear")}.items()
                       for n in names}


@pytest.mark.parametrize("bad, message", [
    (dict(trainable="everything"), "trainable must be one of"),
    (dict(trainable="lora"), "lora_rank"),
    (dict(batch_size=6, accum_steps=4), "multiple of accum_steps"),
    (dict(optimizer="lion"), "optimizer must be one of"),
    (dict(trainable=("llm/(",)), "not a regular expression"),
])
def test_bad_train_configs(bad, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**bad)


def test_pattern_matching_nothing_is_an_error(tiny_models):
    pg = tiny_models["pg1"].pg
    with pytest.raises(TrainConfigError, match="matches no parameter"):
        Trainer(pg.config, TrainConfig(trainable=("vision/",))).init_state(pg.params)


# -- QLoRA: LoRA adapters on a frozen quantised base ----------------------------------------------
def _qlora(pg, scheme: str, **kw) -> Trainer:
    config = TrainConfig(trainable="lora", lora_rank=4, learning_rate=1e-2, batch_size=2, quantize=scheme,
                         group_size=16 if scheme == "int4" else None, **kw)
    return Trainer(pg.config, config)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_qlora_trains_adapters_only_on_an_integer_base_and_merges_exactly(tiny_models, scheme):
    pg = tiny_models["pg1"].pg
    trainer = _qlora(pg, scheme)
    state = trainer.init_state(pg.params)  # a float tree: quantised here
    base = _leaves(state.variables["params"])
    qvalues = {k: v for k, v in base.items() if k.endswith("['qvalue']")}
    assert "['llm']['layers']['attn']['q_einsum']['qvalue']" in qvalues
    assert {str(v.dtype) for k, v in qvalues.items() if "['llm']" in k} == {scheme}
    b = batch_of(pg, seed=5)
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, b)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    after = _leaves(state.variables["params"])
    for name, old in base.items():  # the base is frozen: bit-identical, integers still integers
        assert after[name].dtype == old.dtype and np.array_equal(after[name], old), name
    # The optimizer keeps state for the adapters only: no leaf the size of a base weight.
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.variables["lora"])}
    assert {x.shape for x in jax.tree.leaves(state.opt_state) if x.size > 1} == adapter_shapes
    # Export: float32 weights, the base dequantised plus A B, compute what the quantised model
    # with its adapters computes.
    merged = trainer.inference_params(state)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(merged))
    inputs = (b["pixel_values"], b["input_ids"], b["token_type_ids"])
    applied = jax.jit(trainer.model.apply)(state.variables, *inputs)
    float_model = dataclasses.replace(trainer.model, layout=dataclasses.replace(trainer.layout, quant=None))
    exported = jax.jit(float_model.apply)({"params": merged}, *inputs)
    assert_parity(exported, applied, what=f"{scheme} base + adapters, merged")


def test_qlora_step_equals_float_lora_on_the_dequantized_weights(tiny_models):
    """An int8 QLoRA step's loss, gradients and update are a float32 LoRA step's on the
    dequantised weights: the rounding of the weights is the only difference."""
    pg = tiny_models["pg2"].pg
    q = _qlora(pg, "int8", optimizer="sgd")
    f = Trainer(pg.config, dataclasses.replace(q.train_config, quantize=None))
    q_state = q.init_state(pg.params)
    adapters = jax.tree.map(lambda x: x + 0.05, q_state.variables["lora"])  # B != 0: A gets gradients too
    q_state = q_state.replace(variables={**q_state.variables, "lora": adapters})
    f_state = f.init_state(jax.tree.map(np.asarray, quantize.dequantize_params(q_state.variables["params"])))
    f_state = f_state.replace(variables={**f_state.variables, "lora": jax.tree.map(jnp.array, adapters)})
    b = batch_of(pg, seed=7)

    def loss_and_grads(trainer, state):
        fn = lambda a: trainer.loss({"params": state.variables["params"], "lora": a}, b)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(state.variables["lora"])

    (q_loss, q_grads), (f_loss, f_grads) = loss_and_grads(q, q_state), loss_and_grads(f, f_state)
    assert_parity(q_loss, f_loss, what="loss")
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(q_grads)[0], jax.tree.leaves(f_grads)):
        assert_parity(x, y, what=jax.tree_util.keystr(path))
    q_state, q_metrics = q.step(q_state, b)
    f_state, f_metrics = f.step(f_state, b)
    assert_parity(q_metrics["loss"], f_metrics["loss"], what="step loss")
    for x, y in zip(jax.tree.leaves(q_state.variables["lora"]), jax.tree.leaves(f_state.variables["lora"])):
        assert_parity(x, y, what="updated adapters")


def _step_scratch_bytes(train_config: TrainConfig, depth: int, mlp_dim: int, vocab: int, image_size: int,
                        policy=None) -> int:
    """XLA's scratch memory for the compiled train step (`train.programs`) of a bf16 PaliGemma 1 with
    a 256-wide decoder of `depth` layers, a one-layer vision tower, and `train_config.batch_size`
    rows of 8 text tokens, for `policy` (default: this host's); shapes only, nothing is allocated."""
    from pali_jax.backend import Policy
    from pali_jax.config import preset
    from pali_jax.paligemma import abstract_params
    from pali_jax.train import programs

    big = preset("paligemma-3b-224")
    text = dataclasses.replace(big.text, depth=depth, width=256, mlp_dim=mlp_dim, num_heads=2, head_dim=128,
                               vocab_size=vocab)
    vision = dataclasses.replace(big.vision, depth=1, width=32, mlp_dim=64, num_heads=2, image_size=image_size,
                                 patch_size=8)
    cfg = dataclasses.replace(big, text=text, vision=vision, image_token_id=vocab - 1)
    shape = (train_config.batch_size, cfg.num_image_tokens + 8)
    b = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
    b |= {"loss_mask": jax.ShapeDtypeStruct(shape, jnp.bool_),
          "pixel_values": jax.ShapeDtypeStruct((shape[0], image_size, image_size, 3), jnp.float32)}
    trainer = Trainer(cfg, train_config, jnp.bfloat16, policy=policy or Policy.host())
    state = trainer.abstract_state(abstract_params(cfg, jnp.bfloat16))
    return programs(trainer.policy).step.lower(trainer, state, b).compile().memory_analysis().temp_size_in_bytes


def test_qlora_keeps_no_dequantized_weight_for_the_backward_pass():
    """The compiled QLoRA step's scratch memory stays below the bf16-base LoRA step's by about the
    dequantised weights (which each projection recomputes in the backward pass)."""
    temp = {scheme: _step_scratch_bytes(TrainConfig(trainable="lora", lora_rank=2, batch_size=2, quantize=scheme),
                                        depth=2, mlp_dim=2048, vocab=4096, image_size=32)
            for scheme in (None, "int8")}
    decoder = 2 * (4 * 256 * 256 + 3 * 256 * 2048) * 2  # bf16 bytes of the decoder's projections
    assert temp["int8"] < temp[None] - decoder / 2, temp


def test_qlora_refusals(tiny_models):
    pg = tiny_models["pg1"].pg
    with pytest.raises(TrainConfigError, match="needs trainable='lora'"):
        TrainConfig(trainable="all", quantize="int8")
    with pytest.raises(TrainConfigError, match="unknown quantization 'int3'"):
        TrainConfig(trainable="lora", lora_rank=2, quantize="int3")
    int4 = _qlora(pg, "int4").init_state(pg.params).variables["params"]
    with pytest.raises(TrainConfigError, match=r"quantized \(int4, group size 16\)"):
        _qlora(pg, "int8").init_state(int4)
    with pytest.raises(TrainConfigError, match="quantized"):
        Trainer(pg.config, TrainConfig(trainable="lora", lora_rank=2)).init_state(int4)


def test_cpu_train_step_keeps_no_float32_copy_of_frozen_bf16_weights():
    """Compiled as `train.programs` compiles it for CPU, a LoRA step on a bf16 frozen base converts
    each layer's weights inside the layer loop; with XLA's loop-invariant code motion the
    conversion of every stacked layer would be hoisted out of it: a float32 copy of the model in
    the step's scratch memory."""
    from pali_jax.backend import Policy

    temp = _step_scratch_bytes(TrainConfig(trainable="lora", lora_rank=2, batch_size=1, frozen_dtype="bfloat16"),
                               depth=8, mlp_dim=4096, vocab=512, image_size=16, policy=Policy("cpu"))
    # bytes of the stacked projections in float32; with the hoisting the scratch memory is about 1.5x this
    float32_decoder = 8 * (4 * 256 * 256 + 3 * 256 * 4096) * 4
    assert temp < float32_decoder, (temp, float32_decoder)
