"""Fine-tuning PaliGemma: the loss, what trains, the optimizer and one jitted train step.

Loss: next-token NLL on the suffix tokens (prefix-LM attention). big_vision sums each example's
suffix NLL and divides by that example's suffix length, then averages over the batch
("example", the default); transformers averages over all suffix tokens of the batch ("token").
The two agree when every example has the same suffix length. Optional label smoothing mixes in
the mean NLL over the vocabulary.

What trains: a preset, or regular expressions matched at the start of "/"-joined parameter paths
such as `llm/layers/attn/q_einsum`:

    attn   the LLM attention weights only (Google's PaliGemma fine-tuning colab)
    llm    the whole language model
    all    everything
    lora   rank-r LoRA adapters on the LLM attention and MLP weights (see lora.py); the model is frozen

QLoRA (`quantize="int8" | "int4"`, with "lora" only): the frozen base is held quantised
(`pali_jax.quantize`): its integers and scales are frozen leaves, never updated and given no
optimizer state, and the gradients reach the adapters through the dequantised weights, which each
projection recomputes in the backward pass instead of keeping them (`layers.product`).

Frozen leaves get no optimizer state (`optax.multi_transform` with `set_to_zero`), no gradient
(the loss is differentiated with respect to the trained leaves only) and may be stored in
bfloat16 (mixed precision); trained leaves are float32. One update may average the gradients of
several microbatches (`accum_steps`, a `lax.scan`), exactly: each microbatch returns its loss sum
and its weight (examples or tokens), and the update divides by the total weight.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Literal, Mapping, NamedTuple

import flax.struct
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, SingleDeviceSharding

from pali_jax import backend, lora, quantize, sharding
from pali_jax.backend import Layout, Policy
from pali_jax.config import PaliGemmaConfig
from pali_jax.errors import UserError
from pali_jax.paligemma import PaliGemmaModel, abstract_params, detect_layout, to_layout
from pali_jax.quantize import Quantization
from pali_jax.weights.plan import DTYPES

Reduction = Literal["example", "token"]
TRAINABLE_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("llm/layers/attn/",),
    "llm": ("llm/",),
    "all": ("",),
    "lora": (),
}
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
BATCH_KEYS = ("pixel_values", "input_ids", "token_type_ids", "attention_mask", "loss_mask")


class TrainConfigError(UserError):
    """A fine-tuning setting that cannot work (the message names it)."""


def suffix_nll_terms(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    reduction: Reduction = "example",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """(loss sum, weight) of a batch: the loss is sum / weight, and sums and weights of
    microbatches add up to those of the whole batch.

    "example": sum over rows of each row's mean suffix NLL, weight = rows with a target.
    "token": sum of all suffix-token NLLs, weight = their number.
    logits [B, T, V] (position t predicts token t+1), input_ids [B, T], loss_mask [B, T] True on
    the tokens to predict (suffix + EOS).
    """
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
    if reduction == "token":
        return (nll * mask).sum(), mask.sum()
    counts = mask.sum(axis=1)
    per_example = (nll * mask).sum(axis=1) / jnp.maximum(counts, 1.0)
    return per_example.sum(), (counts > 0).sum().astype(jnp.float32)


def suffix_nll(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    reduction: Reduction = "example",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mean next-token NLL over the suffix tokens (see `suffix_nll_terms`); rows without any target
    token do not count."""
    total, weight = suffix_nll_terms(logits, input_ids, loss_mask, reduction, label_smoothing)
    return total / jnp.maximum(weight, 1.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run's settings. `steps` are optimizer updates, each over `batch_size`
    examples split into `accum_steps` microbatches."""

    steps: int = 1000
    batch_size: int = 32
    accum_steps: int = 1
    optimizer: str = "adamw"
    learning_rate: float = 1e-5
    schedule: str = "cosine"  # linear warmup, then cosine decay to end_lr_fraction * learning_rate
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    b1: float = 0.9  # adamw
    b2: float = 0.999  # adamw
    momentum: float = 0.0  # sgd
    weight_decay: float = 0.0  # adamw, decoupled
    grad_clip: float | None = 1.0  # global norm of the trained gradients
    trainable: str | tuple[str, ...] = "all"  # a TRAINABLE_PRESETS name, or path patterns
    lora_rank: int = 0  # > 0 adds LoRA adapters (always trained); the "lora" preset needs it
    reduction: Reduction = "example"
    label_smoothing: float = 0.0
    frozen_dtype: str = "float32"  # "bfloat16" stores frozen weights in half precision
    remat: bool = False  # recompute each layer's activations in the backward pass
    seed: int = 0  # LoRA init and data order
    quantize: str | None = None  # "int8" / "int4": QLoRA, the frozen base quantised (trainable "lora" only)
    group_size: int | None = None  # int4's group size (default quantize.DEFAULT_GROUP_SIZE)

    def __post_init__(self):
        positive = {"steps": self.steps, "batch_size": self.batch_size, "accum_steps": self.accum_steps,
                    "learning_rate": self.learning_rate}
        for name, value in positive.items():
            if value <= 0:
                raise TrainConfigError(f"{name} must be positive, got {value}")
        if self.batch_size % self.accum_steps:
            raise TrainConfigError(f"batch_size {self.batch_size} is not a multiple of accum_steps {self.accum_steps}")
        choices = {"optimizer": (self.optimizer, OPTIMIZERS), "schedule": (self.schedule, SCHEDULES),
                   "reduction": (self.reduction, ("example", "token")), "frozen_dtype": (self.frozen_dtype, tuple(DTYPES))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise TrainConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if isinstance(self.trainable, str) and self.trainable not in TRAINABLE_PRESETS:
            raise TrainConfigError(
                f"trainable must be one of {', '.join(TRAINABLE_PRESETS)} or a tuple of path patterns, got {self.trainable!r}"
            )
        if self.trainable == "lora" and self.lora_rank <= 0:
            raise TrainConfigError("trainable='lora' needs lora_rank > 0")
        if self.lora_rank < 0 or not 0.0 <= self.label_smoothing < 1.0 or self.warmup_steps < 0:
            raise TrainConfigError("lora_rank and warmup_steps must be >= 0, label_smoothing in [0, 1)")
        try:
            quant = self.quantization
        except quantize.QuantizationError as e:
            raise TrainConfigError(str(e)) from None
        if quant is not None and self.trainable != "lora":
            raise TrainConfigError(f"quantize={self.quantize!r} trains LoRA adapters on a frozen quantized base: "
                                   f"it needs trainable='lora', got {self.trainable!r}")
        if not isinstance(self.trainable, str):
            for pattern in self.trainable:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise TrainConfigError(f"trainable pattern {pattern!r} is not a regular expression: {e}") from None

    @property
    def quantization(self) -> Quantization | None:
        """The base's quantisation (QLoRA), or None; checked (a bad scheme or group size is refused)."""
        return quantize.parse(self.quantize, self.group_size)

    @property
    def patterns(self) -> tuple[str, ...]:
        return TRAINABLE_PRESETS[self.trainable] if isinstance(self.trainable, str) else tuple(self.trainable)

    def learning_rate_schedule(self) -> optax.Schedule:
        """Learning rate by update step: linear warmup from 0, then cosine decay or constant."""
        if self.schedule == "constant":
            warmup = optax.linear_schedule(0.0, self.learning_rate, max(self.warmup_steps, 1))
            return warmup if self.warmup_steps else optax.constant_schedule(self.learning_rate)
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, self.warmup_steps, max(self.steps, self.warmup_steps + 1),
            self.learning_rate * self.end_lr_fraction,
        )


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: saved and restored whole by checkpoint.py."""

    step: jax.Array  # [] int32: optimizer updates done
    variables: dict[str, Any]  # {"params": ..., "lora": ... (with LoRA only)}, as model.apply takes them
    opt_state: Any
    rng: jax.Array  # the run's PRNG key (raw uint32 [2]): LoRA init and the data order derive from it


def _path(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def _same_shapes(params: Any, cfg: PaliGemmaConfig, src: Layout, want: Layout) -> bool:
    """Whether quantised `params` (in `src`) hold `want`'s quantisation: the same tree of shapes
    and dtypes in `src`'s stacking and axis order (an int4 group size the shapes cannot tell apart
    gives the same tree)."""
    target = abstract_params(cfg, layout=dataclasses.replace(want, stacked=src.stacked, out_first=src.out_first))
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.dtype(x.dtype)), tree)  # noqa: E731
    ints = lambda tree: {k: v for k, v in traverse_util.flatten_dict(shapes(tree)).items()  # noqa: E731
                         if quantize.is_quantized_leaf(k)}
    return jax.tree.structure(target) == jax.tree.structure(params) and ints(target) == ints(params)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The model, optimizer and compiled train / eval steps of one run.

    dtype: the activation dtype of the model (float32 or bfloat16); trained weights are float32
    whatever it is. Trainers with equal settings are equal and share their compiled steps.

    mesh (`pali_jax.sharding.make_mesh`): the whole train state (parameters, LoRA adapters,
    optimizer state) lives on its shards by `sharding.param_specs` (optimizer statistics follow
    their parameter; scalars and the RNG key are replicated), batches are split over the batch
    axes (`place_batch`), and every step returns the state in the layout it was given, so one
    program serves the whole run. On a mesh spanning several processes each process builds and
    places only its own rows of every batch (`process_rows`).
    """

    config: PaliGemmaConfig
    train_config: TrainConfig
    dtype: Any = jnp.float32
    mesh: Mesh | None = None
    policy: Policy = dataclasses.field(default_factory=Policy.host)  # the platform the steps are for

    @functools.cached_property
    def model(self) -> PaliGemmaModel:
        return PaliGemmaModel(
            self.config, self.dtype, remat=self.train_config.remat, layout=self.layout, policy=self.policy
        )

    @functools.cached_property
    def layout(self) -> Layout:
        return dataclasses.replace(backend.training_layout(self.dtype), quant=self.train_config.quantization)

    def _in_training_layout(self, params: Any, abstract: bool = False) -> Any:
        """`params` (any decoder layout, e.g. `PaliGemma.params` as loaded for inference) in the
        layout the train step runs; the caller's tree is left as it is. For QLoRA a float tree is
        quantised here (`abstract`: only its shapes are wanted, nothing is computed); a quantised
        tree must hold the run's quantisation."""
        src = detect_layout(params, self.config)
        want = self.layout
        if src.quant is not None and (want.quant is None or not _same_shapes(params, self.config, src, want)):
            held = f"{src.quant.scheme}" + (f", group size {src.quant.group_size}" if src.quant.scheme == "int4" else "")
            raise TrainConfigError(f"the parameters are quantized ({held}): train LoRA adapters on them with "
                                   f"trainable='lora' and the same quantize (and group_size), or load the float model")
        if src.quant is None and want.quant is not None:
            float_layout = dataclasses.replace(want, quant=None)
            if src != float_layout:
                params = to_layout(jax.tree.map(lambda x: x, params), src, float_layout)
            if abstract:
                return abstract_params(self.config, jnp.result_type(*jax.tree.leaves(params)), want)
            return quantize.quantize_params(params, abstract_params(self.config, layout=want))
        src = dataclasses.replace(src, quant=want.quant)  # equal shapes: the tree holds the run's quantisation
        return params if src == want else to_layout(jax.tree.map(lambda x: x, params), src, want)

    @functools.cached_property
    def schedule(self) -> optax.Schedule:
        return self.train_config.learning_rate_schedule()

    @functools.cached_property
    def optimizer(self) -> optax.GradientTransformation:
        t = self.train_config
        if t.optimizer == "sgd":
            opt = optax.sgd(self.schedule, momentum=t.momentum or None)
        else:
            opt = optax.adamw(self.schedule, t.b1, t.b2, weight_decay=t.weight_decay)
        # Inside the "train" branch, clipping sees the trained gradients only.
        chain = optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip else opt
        return optax.multi_transform({"train": chain, "freeze": optax.set_to_zero()}, self.labels)

    # -- what trains ---------------------------------------------------------------------------
    def is_trainable(self, path: tuple[str, ...]) -> bool:
        """path: keys into `TrainState.variables`, e.g. ("params", "llm", "final_norm", "scale")."""
        if path[0] == "lora":
            return True
        name = _path(path[1:])
        return any(re.match(p, name) for p in self.train_config.patterns)

    def labels(self, variables: Mapping[str, Any]) -> Any:
        """"train" / "freeze" for every leaf of `variables`."""
        return jax.tree_util.tree_map_with_path(
            lambda kp, _: "train" if self.is_trainable(tuple(k.key for k in kp)) else "freeze", variables
        )

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, params: Any) -> TrainState:
        """A fresh state from model parameters (any float dtype; `params` is copied, not consumed):
        trained leaves become float32, frozen ones `frozen_dtype`; LoRA adapters are added when
        `lora_rank > 0`. Under a mesh it is computed straight into its shardings (no device
        ever holds the whole state)."""
        params = self._in_training_layout(params)
        if self.mesh is None:
            return self._fresh_state(params)
        shapes = jax.eval_shape(self._fresh_state, params)
        return jax.jit(self._fresh_state, out_shardings=self.state_shardings(shapes))(params)

    def _fresh_state(self, params: Any) -> TrainState:
        t = self.train_config
        rng = jax.random.PRNGKey(t.seed)
        variables: dict[str, Any] = {"params": params}
        if t.lora_rank:
            variables["lora"] = lora.init(self.model, params, t.lora_rank, jax.random.fold_in(rng, 1))
        labels = self.labels(variables)
        if "train" not in jax.tree.leaves(labels):
            raise TrainConfigError(f"trainable {t.trainable!r} matches no parameter: nothing would train")
        frozen = DTYPES[t.frozen_dtype]

        def stored(path, x, label):  # a quantised weight's integers and scales keep their dtypes
            dtype = jnp.float32 if label == "train" else x.dtype if quantize.is_quantized_leaf(path) else frozen
            return jnp.array(x, dtype)  # a copy: the train step donates the state's buffers, not the caller's

        variables = jax.tree_util.tree_map_with_path(stored, variables, labels)
        return TrainState(jnp.zeros((), jnp.int32), variables, self.optimizer.init(variables), rng)

    def abstract_state(self, params: Any) -> TrainState:
        """Shapes, dtypes and shardings of `init_state(params)` (no memory): the target of a
        checkpoint restore, which then places every leaf on its shards (under a mesh) or on the
        first device, whatever the layout it was saved from."""
        shapes = jax.eval_shape(self._fresh_state, self._in_training_layout(params, abstract=True))
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings(shapes)
        )

    def state_shardings(self, shapes: TrainState) -> TrainState:
        """Where each leaf of a train state (arrays or ShapeDtypeStructs) lives:
        `sharding.param_shardings` under a mesh, else the first device."""
        if self.mesh is None:
            device = SingleDeviceSharding(jax.local_devices()[0])
            return jax.tree.map(lambda _: device, shapes)
        return sharding.param_shardings(shapes, self.mesh)

    def process_rows(self) -> np.ndarray:
        """Which rows of each `batch_size`-row batch this process builds and passes to `place_batch`:
        all of them without a mesh or on one process; in a multi-host run, the rows its devices
        hold (`sharding.process_rows`)."""
        rows = self.train_config.batch_size
        return np.arange(rows) if self.mesh is None else sharding.process_rows(rows, self.mesh)

    def place_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A host batch (BATCH_KEYS, [rows, ...]) as the steps take it. Under a mesh the batch is
        this process's rows (`process_rows`: on one process, all `batch_size`) of one global batch,
        split over the batch axes (`sharding.shard_batch`); without a mesh it is used as it is."""
        batch = {k: batch[k] for k in BATCH_KEYS}
        first = self.model.cfg.num_image_tokens + 1
        if np.asarray(batch["loss_mask"])[:, :first].any():
            raise UserError(f"loss_mask marks a target among a row's first {first} positions (image tokens, <bos>): "
                            "targets are suffix tokens, after the image and the prompt")
        return batch if self.mesh is None else sharding.shard_batch(batch, self.mesh, self.train_config.batch_size)

    def inference_params(self, state: TrainState) -> Any:
        """The parameters to run or export: LoRA adapters merged into their weights. A quantised
        base (QLoRA) comes out in float32, dequantised: `W = qvalue * qscale + A B` exactly."""
        params = state.variables["params"]
        if "lora" not in state.variables:
            return params
        return quantize.dequantize_params(lora.merge(self.model, params, state.variables["lora"]))

    # -- loss and steps ------------------------------------------------------------------------
    def _eval_impl(self, variables: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return self._host_readable(self._loss_terms(variables, batch))

    def _host_readable(self, tree: Any) -> Any:
        """Under a mesh, small outputs the host reads made whole on every device."""
        return tree if self.mesh is None else sharding.replicate(tree, self.mesh)

    def _loss_terms(self, variables: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        # Targets come after the image tokens, <bos> and the prompt, whatever the padding: the
        # logits of positions before num_image_tokens predict none (`place_batch` refuses a batch
        # where they would).
        start = self.model.cfg.num_image_tokens
        logits = self.model.apply(
            variables, batch["pixel_values"], batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
            logits_from=start,
        )
        t = self.train_config
        return suffix_nll_terms(logits, batch["input_ids"][:, start:], batch["loss_mask"][:, start:], t.reduction,
                                t.label_smoothing)

    def loss(self, variables: Any, batch: Mapping[str, Any]) -> jax.Array:
        """The training loss of one batch (not jitted: a building block for tests and custom loops)."""
        total, weight = self._loss_terms(variables, batch)
        return total / jnp.maximum(weight, 1.0)

    def step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update over `batch` (PaliGemmaProcessor fields + loss_mask, [batch_size, T]).
        The state's buffers are donated: use the returned state only."""
        return programs(self.policy).step(self, state, batch)

    def _step_impl(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        flat = traverse_util.flatten_dict(state.variables)
        trained = {k: v for k, v in flat.items() if self.is_trainable(k)}
        frozen = {k: v for k, v in flat.items() if k not in trained}

        def terms(trained, micro):
            return self._loss_terms(traverse_util.unflatten_dict({**trained, **frozen}), micro)

        def accumulate(carry, micro):
            grads, total, weight = carry
            (t, w), g = jax.value_and_grad(terms, has_aux=True)(trained, micro)
            return (jax.tree.map(jnp.add, grads, g), total + t, weight + w), None

        accum = self.train_config.accum_steps
        micro = {k: batch[k].reshape(accum, -1, *batch[k].shape[1:]) for k in BATCH_KEYS}
        zero = jnp.zeros((), jnp.float32)
        (grads, total, weight), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, trained), zero, zero), micro)
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        # Frozen leaves get zero "gradients": set_to_zero ignores them, so XLA never computes them.
        full = traverse_util.unflatten_dict({**grads, **jax.tree.map(jnp.zeros_like, frozen)})
        updates, opt_state = self.optimizer.update(full, state.opt_state, state.variables)
        # Frozen leaves come back as they went in (a quantised base's integers cannot take an update).
        updates = traverse_util.flatten_dict(updates)
        trained = optax.apply_updates(trained, {k: updates[k] for k in trained})
        variables = traverse_util.unflatten_dict({**frozen, **trained})
        metrics = {"loss": total / weight, "grad_norm": optax.tree.norm(grads), "learning_rate": self.schedule(state.step)}
        state = state.replace(step=state.step + 1, variables=variables, opt_state=opt_state)
        if self.mesh is not None:
            # Left to itself XLA may return another layout, and the next step would compile again.
            state = sharding.constrain_params(state, self.mesh)
        return state, self._host_readable(metrics)

    def eval_terms(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[float, float]:
        """(loss sum, weight) of one batch (as `place_batch` takes it) under the current weights,
        the same on every process; add them up over batches."""
        total, weight = programs(self.policy).eval(self, state.variables, self.place_batch(batch))
        return float(total), float(weight)


class TrainingPrograms(NamedTuple):
    step: Any  # jit of Trainer._step_impl(trainer, state, batch), the trainer static, the state donated
    eval: Any  # jit of Trainer._eval_impl(trainer, variables, batch)


@functools.cache
def programs(policy: Policy) -> TrainingPrograms:
    """The jitted training programs for `policy`'s platform, with its compiler options
    (`backend.Policy.compiler_options`). One per policy, the trainer a static argument, so equal
    trainers (a resumed run's) reuse what was compiled."""
    options = policy.compiler_options()
    return TrainingPrograms(
        jax.jit(Trainer._step_impl, static_argnums=0, donate_argnums=1, compiler_options=options),
        jax.jit(Trainer._eval_impl, static_argnums=0, compiler_options=options),
    )
