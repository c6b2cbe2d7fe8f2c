"""`GenerationConfig`: every generation option in one validated, frozen object.

It is what `Generator.generate` / `stream`, `BeamSearch.search`, `PaliGemma.generate` /
`generate_ids` / `stream` and `run_generate.py` take, so one rule holds everywhere:

* greedy unless a sampling option (temperature, top_k, top_p) is given; the temperature then
  defaults to 1.0, and temperature=0 is greedy whatever else is set;
* `beams` > 1 runs beam search, which is deterministic: it excludes sampling;
* every value is checked when the object is built (or `replace`d): ints are real ints (numpy
  integers accepted; bools, floats, NaN and inf refused), floats finite and in range.

`check_model` checks what depends on the model (positions, vocabulary) and `check_memory` what
depends on the machine (the KV cache and output buffer, or what `program_bytes` measures of a
compiled program, against free device or host memory), both before anything is allocated. Each refusal is a `GenerationError` (a `UserError`)
naming its parameter, so command-line tools can name their own flag instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Callable, Iterable

import jax
import numpy as np

from pali_jax.config import PaliGemmaConfig
from pali_jax.errors import UserError
from pali_jax.sampling import SamplingParams

MAX_SEED = 2**63  # exclusive: a seed is a non-negative int64
# Options that keep more than the tokens: only the fixed-batch decoder of `generate.py` has them.
RECORDS = ("return_logits", "output_attentions", "output_scores")


class GenerationError(UserError):
    """A generation option out of its range; `parameter` names the option (e.g. "max_new_tokens")."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _integer(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    # bool is an int subclass: True must not pass as max_new_tokens=1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise GenerationError(name, f"{name} must be an int, got {_describe(value)}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise GenerationError(name, f"{name} must be {bound}, got {value}")
    return value


def _optional_integer(name: str, value: Any, minimum: int) -> int | None:
    return None if value is None else _integer(name, value, minimum)


def _real(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise GenerationError(name, f"{name} must be a number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise GenerationError(name, f"{name} must be finite, got {value}")
    return value


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    # A bare int or a string is iterable-looking nonsense here: ask for a sequence.
    if isinstance(value, (str, bytes, numbers.Number, np.generic)) or not isinstance(value, Iterable):
        raise GenerationError(name, f"{name} must be a sequence of token ids, got {_describe(value)}")
    return tuple(_integer(name, token, 0) for token in value)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Options of one generation call; validated on construction and on `replace`.

    max_new_tokens: tokens to generate at most (the stop token included).
    temperature / top_k / top_p: sampling; None means "not given". Sampling happens when any is
        given and the temperature (default 1.0 then) is > 0. top_k=0 and top_p=1.0 are no filter.
    beams: beam-search width; 1 decodes greedily or by sampling.
    length_penalty: beam search's exponent alpha in `sum(log p) / length**alpha`.
    seed: the sampling seed, an int in [0, 2**63); seeds differ in all 63 bits.
    stop_tokens: token ids that end a row besides the model's EOS (kept in the output).
    cache_length: KV-cache slots (None: prompt bucket + output buffer); a smaller cache stops
        with `StopReason.CACHE_FULL`.
    return_logits: keep every step's logits ([B, n, V] float32; `generate_ids` only).
    output_attentions: keep, per new token, every layer's and head's attention over the cache
        (the pass that produced the token), and the prefill's (float32; see `GenerateOutput`).
    output_scores: keep each new token's log-probability under the model (before sampling filters).
    batch_size: rows per compiled call in `PaliGemma`'s methods (None: all at once).
    """

    max_new_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    beams: int = 1
    length_penalty: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    cache_length: int | None = None
    return_logits: bool = False
    output_attentions: bool = False
    output_scores: bool = False
    batch_size: int | None = None

    def __post_init__(self):
        temperature = None if self.temperature is None else _real("temperature", self.temperature)
        if temperature is not None and temperature < 0:
            raise GenerationError("temperature", f"temperature must be >= 0 (0 is greedy), got {temperature}")
        top_p = None if self.top_p is None else _real("top_p", self.top_p)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise GenerationError("top_p", f"top_p must be in (0, 1] (1 disables it), got {top_p}")
        for name in RECORDS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise GenerationError(name, f"{name} must be a bool, got {_describe(getattr(self, name))}")
        normalised = dict(
            max_new_tokens=_integer("max_new_tokens", self.max_new_tokens, 1),
            temperature=temperature,
            top_k=_optional_integer("top_k", self.top_k, 0),
            top_p=top_p,
            beams=_integer("beams", self.beams, 1),
            length_penalty=_real("length_penalty", self.length_penalty),
            seed=_integer("seed", self.seed, 0, MAX_SEED - 1),
            stop_tokens=_token_ids("stop_tokens", self.stop_tokens),
            cache_length=_optional_integer("cache_length", self.cache_length, 1),
            **{name: bool(getattr(self, name)) for name in RECORDS},
            batch_size=_optional_integer("batch_size", self.batch_size, 1),
        )
        for name, value in normalised.items():  # numpy scalars become Python ones: hashable, printable
            object.__setattr__(self, name, value)
        if self.beams > 1 and self.do_sample:
            raise GenerationError(
                "beams", f"beams={self.beams} runs beam search, which is deterministic: drop temperature / top_k / "
                "top_p, or use beams=1"
            )
        if self.beams > 1 and self.records:
            name = self.records[0]
            raise GenerationError(name, f"{name} is for greedy or sampled decoding, not beam search")

    @property
    def records(self) -> tuple[str, ...]:
        """The options that keep more than tokens (`RECORDS`) that are on."""
        return tuple(name for name in RECORDS if getattr(self, name))

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with `changes` applied, validated as a new one; unknown names are refused."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise GenerationError(unknown[0], f"unknown generation option {unknown[0]!r}; the options are {known}")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def resolve(cls, config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
        """`config` (default: all defaults) with keyword `options` overriding its fields."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise GenerationError(
                "generation_config", f"generation_config must be a GenerationConfig, got {_describe(config)}"
            )
        return (config or cls()).replace(**options)

    @property
    def effective_temperature(self) -> float:
        """The temperature decoding uses: as given, else 1.0 if top_k / top_p is given, else 0 (greedy)."""
        if self.temperature is not None:
            return self.temperature
        return 1.0 if self.top_k is not None or self.top_p is not None else 0.0

    @property
    def do_sample(self) -> bool:
        """Whether decoding samples (derived: there is no separate switch to contradict the options)."""
        return self.effective_temperature > 0

    def sampling_params(self) -> SamplingParams:
        """The traced sampler settings (fixed dtypes: new values reuse the compiled program)."""
        return SamplingParams.make(
            self.effective_temperature, self.top_k or 0, 1.0 if self.top_p is None else self.top_p
        )

    def prng_key(self) -> np.ndarray:
        """The decode loop's key, [2] uint32. `jax.random.PRNGKey` keeps only a seed's low 32 bits
        (without x64), so the high bits are folded in: seeds 2**32 apart differ. Seeds below 2**32
        keep `PRNGKey(seed)`, which for the default threefry generator is [0, seed]: made here on
        the host, since a server makes one per request and a dispatched JAX op costs it more than
        the rest of a request's preparation."""
        if self.seed >> 32 == 0 and jax.config.jax_default_prng_impl == "threefry2x32":
            return np.array([0, self.seed], np.uint32)
        key = jax.random.PRNGKey(self.seed & 0xFFFFFFFF)
        return np.asarray(jax.random.fold_in(key, self.seed >> 32) if self.seed >> 32 else key)

    def check_model(self, cfg: PaliGemmaConfig) -> None:
        """Checks what needs the model but no prompt: room for a prompt within the model's
        positions, and stop tokens inside its vocabulary."""
        limit = cfg.text.max_positions
        room = limit - cfg.num_image_tokens - 1  # the shortest prompt: the image tokens and one more
        if self.max_new_tokens > room:
            raise GenerationError(
                "max_new_tokens",
                f"max_new_tokens must be <= {room} for this model, got {self.max_new_tokens}: prompt and answer "
                f"share its {limit} positions (config.text.max_positions), {cfg.num_image_tokens + 1} of them at "
                "least for the image tokens and the prompt",
            )
        bad = [t for t in self.stop_tokens if t >= cfg.vocab_size]
        if bad:
            raise GenerationError(
                "stop_tokens", f"stop_tokens must be token ids in [0, {cfg.vocab_size}), got {bad[0]}"
            )

    def check_prompt_length(self, cfg: PaliGemmaConfig, prompt_tokens: int) -> None:
        """The longest prompt (real tokens, image tokens included) plus the answer must fit the
        model's positions."""
        limit = cfg.text.max_positions
        if prompt_tokens + self.max_new_tokens > limit:
            raise GenerationError(
                "prompt",
                f"prompt too long: {prompt_tokens} tokens (image tokens included) + max_new_tokens="
                f"{self.max_new_tokens} exceed the model's {limit} positions (config.text.max_positions); "
                "shorten the prompt or lower max_new_tokens",
            )


def free_memory(device: jax.Device | None = None) -> tuple[int, str]:
    """(bytes free, where): the accelerator's unused memory where JAX reports it, else the host's
    available RAM (CPU arrays live there)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.platform} device memory"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, "available host memory"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host memory"


def _device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree`'s arrays: a jax array's shard on it (all of it unsharded),
    a host array's whole size."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            total += leaf.addressable_shards[0].data.nbytes
        elif hasattr(leaf, "nbytes"):
            total += leaf.nbytes
    return total


def program_bytes(program: Callable, *args: Any, resident: Any = ()) -> int:
    """Bytes one device allocates to run `program` (a `jax.jit` function) on `args` (arrays or
    `jax.ShapeDtypeStruct`s), from XLA's own memory analysis of the compiled program: its
    arguments, its outputs (less those aliased to donated arguments) and its temporaries, less
    `resident`, arguments already in memory (a model's params: counted in the free memory's
    use). Compiling allocates nothing, and a call with the same shapes afterwards reuses this
    compiled program (jit's cache), so checking the real shape costs no second compile."""
    stats = program.lower(*args).compile().memory_analysis()
    if stats is None:  # a backend without the analysis: nothing to measure against
        return 0
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    return max(0, total - _device_bytes(resident))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(
    need: int, what: str, parameter: str, devices: int = 1, device: jax.Device | None = None, *,
    task: str = "generation", advice: str = "lower max_new_tokens, cache_length, batch_size or beams",
) -> None:
    """Refuses a `task` whose buffers (`need` bytes, spread over `devices`) exceed the free memory
    of one device (or of the host for CPU devices, which all share it); `parameter` is the option
    the error is charged to, `advice` what to change."""
    device = device or jax.devices()[0]
    free, where = free_memory(device)
    per_device = need if device.platform == "cpu" else -(-need // devices)
    if per_device > free:
        raise GenerationError(
            parameter, f"{task} needs {_gib(per_device)} for {what}, more than the {_gib(free)} of {where}: {advice}"
        )
