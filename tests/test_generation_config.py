"""GenerationConfig: every bad option refused up front (before anything compiles) at every entry
point, one default rule everywhere, seeds in all 63 bits, limits against the model and memory,
batched streaming, and run_generate.py's one-line errors. Runs on the bundled demo model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pali_jax import GenerationConfig, PaliGemma, UserError, preprocess_images
from pali_jax import generation_config as gc_module
from pali_jax.decode import StopReason

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "pali_jax" / "assets" / "demo"
IMAGES = [DEMO / "images" / "shapes_0.png", DEMO / "images" / "shapes_1.png"]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def pg() -> PaliGemma:
    return PaliGemma.from_pretrained(DEMO / "model")


@pytest.fixture(scope="module")
def arrays(pg):
    """`caption en` on the first sample image, as generate_ids takes it."""
    pixels = preprocess_images([IMAGES[0]], pg.config.image_size)
    batch = pg.tokenizer(["caption en"], num_image_tokens=pg.config.num_image_tokens)
    return pixels, batch.input_ids, batch.attention_mask


def compiled(pg: PaliGemma) -> int:
    """Programs compiled so far by every generation entry point."""
    return sum(f._cache_size() for f in (pg.generator._generate, pg.generator._prefill, pg.generator._step,
                                         pg.beam_search._run))


ENTRY_POINTS = {
    "generate": lambda pg, arrays, kw: pg.generate(IMAGES[0], "caption en", **kw),
    "stream": lambda pg, arrays, kw: list(pg.stream(IMAGES[0], "caption en", **kw)),
    "generate_ids": lambda pg, arrays, kw: pg.generate_ids(arrays[0], arrays[1], attention_mask=arrays[2], **kw),
}

# The demo model: 256 positions, 16 image tokens, vocabulary 1792; `caption en` is a 32-slot prompt.
BAD = {
    "max_new_tokens": [0, -1, 3.5, 3.0, NAN, INF, True, "8", None, 240, 10**8],
    "temperature": [-0.5, NAN, INF, -INF, "1", True, [1.0]],
    "top_k": [-1, 2.5, NAN, INF, True, "5"],
    "top_p": [0, 0.0, -0.1, 1.5, NAN, INF, True, "0.9"],
    "beams": [0, -2, 2.5, NAN, True, "4"],
    "seed": [-1, 2**63, 2**64, 1.5, NAN, True, "0"],
    "batch_size": [0, -1, 1.5, NAN, True, "2"],
    "cache_length": [0, -1, 1.5, True, 20, 10**12],
    "stop_tokens": [[-1], [1792], [10**9], [1.5], [True], 5, "1", None],
    "length_penalty": [NAN, INF, "1"],
    "return_logits": ["yes", 1, None],
}
CASES = [(name, value) for name, values in BAD.items() for value in values]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_bad_option_refused_before_compiling(pg, arrays, entry, name, value):
    before, start = compiled(pg), time.perf_counter()
    with pytest.raises(UserError, match=name) as info:
        ENTRY_POINTS[entry](pg, arrays, {name: value})
    assert time.perf_counter() - start < 1.0
    assert compiled(pg) == before, "a bad option must be refused before anything compiles"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_option_is_named(pg, arrays, entry):
    with pytest.raises(UserError, match="unknown generation option 'max_tokens'"):
        ENTRY_POINTS[entry](pg, arrays, {"max_tokens": 8})


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_huge_max_new_tokens_fails_fast(pg, arrays, entry):
    """Once 16 GB allocated before the run (10**6) or a 40-minute hang (10**8); and
    `generate` blamed the prompt for having "more than max_length=-99999744" tokens."""
    for n in (10**6, 10**8):
        start = time.perf_counter()
        with pytest.raises(UserError, match="max_new_tokens must be <= 239") as info:
            ENTRY_POINTS[entry](pg, arrays, dict(max_new_tokens=n, temperature=5.0, stop_tokens=[]))
        assert time.perf_counter() - start < 1.0
        assert "max_length" not in str(info.value)


def test_prompt_and_answer_must_fit_the_positions(pg, arrays):
    pixels, ids, _ = arrays
    long = np.concatenate([ids, np.full((1, 150), 5, np.int32)], axis=1)  # 16 image + 154 text tokens
    with pytest.raises(UserError, match=r"prompt too long: 170 tokens .* max_new_tokens=100 exceed .* 256 positions"):
        pg.generate_ids(pixels, long, max_new_tokens=100)


def test_memory_is_checked_from_shapes(pg, arrays, monkeypatch):
    pixels, ids, mask = arrays
    monkeypatch.setattr(gc_module, "free_memory", lambda device=None: (10_000, "available host memory"))
    before = compiled(pg)
    with pytest.raises(UserError, match=r"needs .* GiB for the KV cache and output buffers .* lower max_new_tokens"):
        pg.generate_ids(pixels, ids, attention_mask=mask, max_new_tokens=8)
    with pytest.raises(UserError, match=r"\(8 rows, "):
        pg.generate(IMAGES[0], "caption en", beams=8, max_new_tokens=8)  # beams multiply the rows
    assert compiled(pg) == before


def test_program_bytes_is_xla_s_own_count_less_what_is_resident():
    import jax
    import jax.numpy as jnp

    def f(weights, x):  # a [1000, 1000] temporary: the outer product, then reduced
        return (jnp.tanh(x[:, None] * x[None, :]) @ weights).sum(0)

    weights, x = jnp.ones((1000, 8), jnp.float32), np.ones(1000, np.float32)
    program = jax.jit(f)
    stats = program.lower(weights, x).compile().memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    assert gc_module.program_bytes(program, weights, x) == total
    assert total >= weights.nbytes + x.nbytes + 8 * 4  # at least its inputs and output
    assert gc_module.program_bytes(program, weights, jax.ShapeDtypeStruct(x.shape, x.dtype)) == total  # shapes suffice
    assert gc_module.program_bytes(program, weights, x, resident=weights) == total - weights.nbytes
    # A donated input reused for the output is not counted twice.
    donated = jax.jit(lambda a: a * 2, donate_argnums=0)
    assert gc_module.program_bytes(donated, jnp.ones(1000, jnp.float32)) <= 2 * 4000


def test_free_memory_reads_the_host_on_cpu():
    import jax

    free, where = gc_module.free_memory()
    assert 0 < free < 2**50
    if jax.devices()[0].platform == "cpu":
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        assert where == "available host memory"
        assert abs(free - int(meminfo["MemAvailable"].split()[0]) * 1024) < 2**30  # it moves while we read


# -- the config object ----------------------------------------------------------------------------
def test_config_normalises_numpy_values_and_is_frozen():
    config = GenerationConfig(max_new_tokens=np.int64(8), top_k=np.int32(5), seed=np.uint64(2**40),
                              stop_tokens=np.array([3, 4]), temperature=np.float32(0.5))
    assert (config.max_new_tokens, config.top_k, config.seed, config.stop_tokens) == (8, 5, 2**40, (3, 4))
    assert type(config.max_new_tokens) is int and type(config.temperature) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_new_tokens = 9  # type: ignore[misc]
    assert hash(config) == hash(GenerationConfig(max_new_tokens=8, top_k=5, seed=2**40, stop_tokens=(3, 4),
                                                 temperature=0.5))


def test_replace_validates_and_overrides():
    base = GenerationConfig(max_new_tokens=8, top_p=0.9)
    assert base.replace(max_new_tokens=4) == GenerationConfig(max_new_tokens=4, top_p=0.9)
    assert base.replace() is base
    with pytest.raises(UserError, match="max_new_tokens"):
        base.replace(max_new_tokens=0)
    with pytest.raises(UserError, match="generation_config must be a GenerationConfig"):
        GenerationConfig.resolve({"max_new_tokens": 4}, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("options, temperature", [
    ({}, 0.0), ({"top_k": 5}, 1.0), ({"top_p": 0.9}, 1.0), ({"top_k": 0}, 1.0), ({"temperature": 0.7}, 0.7),
    ({"temperature": 0.0, "top_k": 5}, 0.0), ({"beams": 3}, 0.0), ({"beams": 3, "temperature": 0}, 0.0),
])
def test_the_default_rule(options, temperature):
    """Greedy unless a sampling option is given; then the temperature defaults to 1.0."""
    config = GenerationConfig(**options)
    assert config.effective_temperature == temperature and config.do_sample == (temperature > 0)
    assert float(config.sampling_params().temperature) == pytest.approx(temperature)


@pytest.mark.parametrize("options", [
    {"beams": 2, "top_k": 5}, {"beams": 2, "temperature": 1.0}, {"beams": 2, "top_p": 0.5},
])
def test_beam_search_refuses_sampling(options):
    with pytest.raises(UserError, match="deterministic"):
        GenerationConfig(**options)


def test_top_k_samples_in_every_entry_point(pg, arrays, monkeypatch):
    """generate_ids(top_k=5) was greedy while generate(top_k=5) sampled: both hand the compiled
    program temperature 1 now (the demo model is too sure of itself for the tokens to show it)."""
    temperatures = []
    program = pg.generator._generate

    def spy(statics, params, pixels, ids, types, mask, max_new_tokens, sampling, key, stops):
        temperatures.append(float(sampling.temperature))
        return program(statics, params, pixels, ids, types, mask, max_new_tokens, sampling, key, stops)

    monkeypatch.setattr(pg.generator, "_generate", spy)
    pixels, ids, mask = arrays
    pg.generate_ids(pixels, ids, attention_mask=mask, top_k=5, max_new_tokens=4)
    pg.generate(IMAGES[0], "caption en", top_k=5, max_new_tokens=4)
    pg.generate_ids(pixels, ids, attention_mask=mask, generation_config=GenerationConfig(top_k=5), max_new_tokens=4)
    pg.generate_ids(pixels, ids, attention_mask=mask, max_new_tokens=4)
    assert temperatures == [1.0, 1.0, 1.0, 0.0]


def test_keywords_override_the_config(pg):
    config = GenerationConfig(max_new_tokens=2)
    [short] = pg.generate(IMAGES[0], "caption en", generation_config=config)
    [longer] = pg.generate(IMAGES[0], "caption en", generation_config=config, max_new_tokens=4)
    assert len(short.token_ids) == 2 and len(longer.token_ids) == 4
    assert longer.token_ids[:2] == short.token_ids and longer.stop_reason == "max_new_tokens"


# -- seeds ----------------------------------------------------------------------------------------
def test_seeds_2_to_the_32_apart_differ(pg, arrays):
    """`PRNGKey` keeps a seed's low 32 bits only: --seed 4294967296 once gave --seed 0's text."""
    pixels, ids, mask = arrays
    sample = lambda seed: pg.generate_ids(  # noqa: E731
        pixels, ids, attention_mask=mask, temperature=5.0, max_new_tokens=8, seed=seed
    ).tokens
    for low in (0, 7):
        assert not np.array_equal(sample(low), sample(low + 2**32))
    np.testing.assert_array_equal(sample(2**32 + 7), sample(2**32 + 7))
    keys = {tuple(np.asarray(GenerationConfig(seed=s).prng_key()).tolist()) for s in (0, 2**32, 2**62, 2**63 - 1)}
    assert len(keys) == 4


def test_seeds_below_2_to_the_32_keep_their_key():
    import jax

    for seed in (0, 1, 2**32 - 1):
        np.testing.assert_array_equal(GenerationConfig(seed=seed).prng_key(), jax.random.PRNGKey(seed))


def test_options_do_not_recompile(pg, arrays):
    pixels, ids, mask = arrays
    pg.generate_ids(pixels, ids, attention_mask=mask, max_new_tokens=4)
    traces = pg.generator.traces
    for options in (dict(temperature=0.3, seed=2**40), dict(top_k=7, top_p=0.5, max_new_tokens=20),
                    dict(stop_tokens=[5, 6]), dict(temperature=2.0, seed=2**63 - 1, max_new_tokens=31)):
        pg.generate_ids(pixels, ids, attention_mask=mask, **options)
    assert pg.generator.traces == traces


# -- batches --------------------------------------------------------------------------------------
# Every batch here has two rows, so that the whole section compiles one generate and one stream.
# (The single-prompt stream yielding str is checked in test_cli.py.)
PROMPTS = ["caption en", "answer en what color is the circle?"]


@pytest.fixture(scope="module")
def two_rows(pg):
    pixels = preprocess_images(IMAGES * 2, pg.config.image_size)
    enc = pg.tokenizer(PROMPTS * 2, num_image_tokens=pg.config.num_image_tokens)
    return pixels, enc


def test_batched_stream_equals_generate_row_by_row(pg):
    results = pg.generate(IMAGES, PROMPTS, max_new_tokens=12)
    assert results[0].text != results[1].text
    steps = list(pg.stream(IMAGES, PROMPTS, max_new_tokens=12))
    assert all(isinstance(step, list) and len(step) == 2 for step in steps)
    assert ["".join(step[row] for step in steps) for row in range(2)] == [r.text for r in results]
    # Four rows in batches of two stream one batch after the other: "" for the waiting rows.
    steps = list(pg.stream(IMAGES * 2, PROMPTS * 2, max_new_tokens=12, batch_size=2))
    assert ["".join(step[row] for step in steps) for row in range(4)] == [r.text for r in results] * 2
    first = [step for step in steps if step[0] or step[1]]
    assert first and all(step[2] == step[3] == "" for step in first)


def test_batched_stream_tokens_equal_generate(pg, two_rows):
    pixels, enc = two_rows
    args = (pg.params, pixels[:2], enc.input_ids[:2], enc.token_type_ids[:2], enc.attention_mask[:2])
    out = pg.generator.generate(*args, max_new_tokens=12, temperature=3.0, seed=5)
    streamed = np.stack(list(pg.generator.stream(*args, max_new_tokens=12, temperature=3.0, seed=5)), axis=1)
    np.testing.assert_array_equal(streamed[:, : out.tokens.shape[1]], out.tokens)
    assert (streamed[:, out.tokens.shape[1] :] == pg.config.pad_token_id).all()


def test_generate_ids_batches_join_as_one(pg, two_rows):
    pixels, enc = two_rows
    kw = dict(attention_mask=enc.attention_mask[:2], max_new_tokens=10)
    pair = pg.generate_ids(pixels[:2], enc.input_ids[:2], **kw)
    joined = pg.generate_ids(pixels, enc.input_ids, **{**kw, "attention_mask": enc.attention_mask}, batch_size=2)
    assert pair.lengths[0] != pair.lengths[1]  # rows of different lengths: the padding is tested
    np.testing.assert_array_equal(joined.tokens, np.concatenate([pair.tokens, pair.tokens]))
    assert joined.lengths.tolist() == pair.lengths.tolist() * 2 and joined.stop_reason == pair.stop_reason * 2
    assert joined.stop_reason[0] == StopReason.STOP_TOKEN


# -- run_generate.py ------------------------------------------------------------------------------
CLI_CASES = [
    (["--seed", str(2**63)], "error: --seed must be in [0, 9223372036854775807], got 9223372036854775808"),
    (["--max-tokens", "100000000"], "error: --max-tokens must be <= 239 for this model"),
    (["--temperature", "nan"], "error: --temperature must be finite, got nan"),
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--top-k", "2.5"], "error: argument --top-k: invalid int value: '2.5'"),
    (["--beams", "-2"], "error: --beams must be >= 1, got -2"),
    (["--top-p", "inf"], "error: --top-p must be finite, got inf"),
    (["--seed", "-1"], "error: --seed must be in [0, 9223372036854775807], got -1"),
]


def _cli_args(args: list[str]) -> list[str]:
    # An explicit --model: the demo's note on stderr would make two lines.
    return ["run_generate.py", "--model", str(DEMO / "model"), *args, "--no-compilation-cache"]


def test_cli_in_real_processes():
    """The first three cases as real processes (run at once: each spends seconds importing jax)."""
    procs = [
        (args, message, subprocess.Popen([sys.executable, *_cli_args(args)], cwd=ROOT, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for args, message in CLI_CASES[:3]
    ]
    for args, message, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith(message), (args, err)
        assert "Traceback" not in err and out == "", args


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_one_line_and_exit_code_2(args, message, capsys):
    from pali_jax import cli

    try:
        code = cli.main(["generate", *_cli_args(args)[1:]])
    except SystemExit as e:  # argparse's own errors leave this way
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(message), err
