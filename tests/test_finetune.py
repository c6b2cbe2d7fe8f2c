"""The fine-tuning entry point, data loading and training checkpoints (on the tiny PaliGemma 1)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import PIL.Image
import pytest
from hostile import (  # noqa: F401  (fixtures)
    BAD_DATA_LINES,
    GOOD_LINE,
    LONG_TEXT,
    READ_ONLY,
    _data_file,
    _line,
    assert_one_line_error,
    call,
    data,
    finetune_main,
    images,
    listing,
)

from benchmarks import kill_points
from pali_jax import cli, finetune, lora
from pali_jax.backend import CHECKPOINT_LAYOUT
from pali_jax.checkpoint import TrainCheckpointer, restore_params
from pali_jax.data import DataError, Dataset, Example, read_jsonl
from pali_jax.demo import shapes
from pali_jax.model_dir import read_quantization
from pali_jax.pretrained import PaliGemma
from pali_jax.processor import PaliGemmaProcessor, PaliGemmaTokenizer
from pali_jax.quantize import Quantization

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tiny_models, tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny PaliGemma 1 HF checkpoint with the tiny tokenizer beside it."""
    out = tmp_path_factory.mktemp("model") / "pg1"
    shutil.copytree(tiny_models["pg1"].hf_dir, out)
    shutil.copy(tokenizer_dir / "tokenizer.model", out)
    return out


def write_split(directory: Path, name: str, n_scenes: int, seed: int) -> Path:
    """A JSONL file of shapes-task examples with its PNG images."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(shapes.scenes(n_scenes, seed)):
        image = f"images/{name}-{i}.png"
        PIL.Image.fromarray(shapes.render(scene)).save(directory / image)
        lines += [json.dumps({"image": image, "prefix": p, "suffix": s}) for p, s in shapes.prompts(scene)[:2]]
    path = directory / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_split(out, "train", 24, seed=1)
    write_split(out, "eval", 4, seed=2)
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["finetune", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_eval_export_and_exact_resume(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", model_dir, "--train", data_dir / "train.jsonl", "--eval", data_dir / "eval.jsonl",
            "--out", out, "--steps", 20, "--batch-size", 4, "--lr", 5e-3, "--warmup-steps", 2,
            "--checkpoint-every", 10, "--keep", 2, "--eval-every", 10, "--eval-limit", 4, "--no-progress"]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10", "20"]
    # A baseline at step 0, then every 10 steps: held-out loss and generation scores per task.
    losses = [float(x) for x in re.findall(r"eval loss ([\d.]+)", stderr)]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], stderr
    assert "caption: exact" in stderr and "answer: exact" in stderr
    # The exported directory is a normal model directory, holding the trained weights.
    straight = restore_params(out / "model" / "params")
    pg = PaliGemma.from_pretrained(out / "model")
    assert pg.tokenizer.vocab_size == PaliGemmaTokenizer(model_dir).vocab_size
    with TrainCheckpointer(out / "checkpoints", every=10) as ckpt:
        final = ckpt.restore(None, step=20)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(final["variables"]["params"])):
        assert np.array_equal(a, b)

    # As if the run had died after step 10: resuming gives exactly the uninterrupted result.
    shutil.rmtree(out / "checkpoints" / "20")
    resume_args = [a for a in args if a not in ("--eval", data_dir / "eval.jsonl")] + ["--resume"]
    code, _, stderr = run(capsys, *resume_args)
    assert code == 0, stderr
    assert "resumed from step 10" in stderr
    resumed = restore_params(out / "model" / "params")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)

    # Starting over in a directory that holds checkpoints needs --resume.
    code, _, stderr = run(capsys, *args)
    assert code == 2 and "--resume" in stderr and len(stderr.strip().splitlines()) == 1


def test_qlora_trains_resumes_exactly_and_exports_merged_or_apart(model_dir, data_dir, tmp_path, capsys):
    """--quantize int4 with --trainable lora: the checkpoints hold the integer base untouched, the
    default export is a float directory (base dequantised + adapters), a run resumed from a
    checkpoint ends where the uninterrupted one did, and --export-adapters-apart writes the
    quantised base and the adapters, which load merged into the same weights."""
    out = tmp_path / "run"
    args = ["--model", model_dir, "--train", data_dir / "train.jsonl", "--out", out, "--steps", 6, "--batch-size", 4,
            "--lr", 5e-3, "--trainable", "lora", "--lora-rank", 4, "--quantize", "int4", "--group-size", 16,
            "--checkpoint-every", 3, "--no-progress"]
    code, _, stderr = run(capsys, *args)
    assert code == 0, stderr
    losses = [float(x) for x in re.findall(r"loss ([\d.]+) -> ([\d.]+)", stderr)[0]]
    assert losses[1] < losses[0], stderr
    with TrainCheckpointer(out / "checkpoints", every=3) as ckpt:
        final = ckpt.restore(None, step=6)
    base = final["variables"]["params"]
    q = base["llm"]["layers"]["attn"]["q_einsum"]["qvalue"]
    source = PaliGemma.from_pretrained(model_dir, quantize="int4", group_size=16).checkpoint_params()
    assert str(q.dtype) == "int4" and np.array_equal(q, source["llm"]["layers"]["attn"]["q_einsum"]["qvalue"])
    assert read_quantization(out / "model") is None  # merged: an ordinary float directory
    merged = restore_params(out / "model" / "params")
    assert {str(x.dtype) for x in jax.tree.leaves(merged)} == {"float32"}

    shutil.rmtree(out / "checkpoints" / "6")
    code, _, stderr = run(capsys, *args, "--resume", "--export-adapters-apart")
    assert code == 0 and "resumed from step 3" in stderr, stderr
    assert read_quantization(out / "model") == Quantization("int4", 16)
    assert (out / "model" / lora.ADAPTERS_FILE).is_file()
    apart = restore_params(out / "model" / "params")
    assert np.array_equal(apart["llm"]["layers"]["attn"]["q_einsum"]["qvalue"], q)
    loaded = PaliGemma.from_pretrained(out / "model", layout=CHECKPOINT_LAYOUT)  # merged as it loads
    assert loaded.layout.quant is None
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(loaded.params)):
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_checkpointer_keeps_the_last_k(tmp_path):
    state = {"w": np.arange(3.0, dtype=np.float32), "step": np.int32(0)}
    with TrainCheckpointer(tmp_path, every=2, keep=2) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, {**state, "step": np.int32(s)})]
        assert saved == [2, 4, 6]
        assert ckpt.save(7, {**state, "step": np.int32(7)}, force=True)
        assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 7]
        restored = ckpt.restore(jax.tree.map(np.asarray, state), step=6)
    assert int(restored["step"]) == 6 and np.array_equal(restored["w"], state["w"])


BAD_LINES = [
    ('{"image": "images/train-0.png", "prefix": "caption en"}', "missing field 'suffix'"),
    ('{"image": "images/train-0.png", "prefix": 3, "suffix": "x"}', "field 'prefix' must be a string"),
    ('{"image": "nowhere.png", "prefix": "a", "suffix": "b"}', "image file not found"),
    ('{"image": "train.jsonl", "prefix": "a", "suffix": "b"}', "cannot read image"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"image": ', "not valid JSON"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_data_line_is_a_one_line_error(model_dir, data_dir, tmp_path, capsys, line, message):
    good = (data_dir / "train.jsonl").read_text().splitlines()
    bad = data_dir / "bad.jsonl"
    bad.write_text("\n".join(good[:2] + [line] + good[2:]) + "\n")
    code, _, stderr = run(capsys, "--model", model_dir, "--train", bad, "--out", tmp_path / "run")
    assert code == 2
    assert stderr.startswith(f"error: {bad}:3: {message}") and len(stderr.strip().splitlines()) == 1


def test_skip_bad_lines_warns_and_goes_on(data_dir):
    good = (data_dir / "train.jsonl").read_text().splitlines()
    path = data_dir / "mixed.jsonl"
    path.write_text("\n".join([good[0], BAD_LINES[0][0], "", good[1], BAD_LINES[-1][0]]) + "\n")
    warnings = []
    examples = read_jsonl(path, skip_bad=True, warn=warnings.append)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert [w.split(": ", 1)[0] for w in warnings] == [f"skipped {path}:2", f"skipped {path}:5"]
    path.write_text(BAD_LINES[0][0] + "\n")
    with pytest.raises(DataError, match="holds no usable example"):
        read_jsonl(path, skip_bad=True, warn=warnings.append)


def test_too_long_examples(tokenizer_dir):
    processor = PaliGemmaProcessor(PaliGemmaTokenizer(tokenizer_dir), 16, 16)
    examples = [Example(np.zeros((8, 8, 3), np.uint8), "caption en", "a red circle " * n, f"x.jsonl:{n}") for n in (1, 9)]
    with pytest.raises(DataError, match=r"x.jsonl:9: \d+ tokens \(16 image tokens\) exceed max_length 40"):
        Dataset(examples, processor, max_length=40)
    data = Dataset(examples, processor, max_length=40, skip_bad=True, warn=lambda _: None)
    batch = data.batch([0], rows=3)
    assert batch["input_ids"].shape == (3, 40) and not batch["loss_mask"][1:].any()


def test_training_order_is_a_function_of_key_and_step(tokenizer_dir):
    processor = PaliGemmaProcessor(PaliGemmaTokenizer(tokenizer_dir), 16, 16)
    data = Dataset([Example(np.zeros((8, 8, 3), np.uint8), "a", "b") for _ in range(10)], processor)
    key = np.array([0, 7], np.uint32)
    steps = np.concatenate([data.train_indices(s, 4, key) for s in range(5)])
    # Epochs are permutations: 20 draws over 10 examples visit each exactly twice.
    assert np.array_equal(np.bincount(steps), np.full(10, 2))
    assert np.array_equal(data.train_indices(3, 4, key), steps[12:16])
    assert not np.array_equal(data.train_indices(0, 4, np.array([0, 8], np.uint32)), steps[:4])


def test_process_rows_make_up_the_whole_batch(tokenizer_dir):
    """A multi-host run's processes each build some rows of every batch (Trainer.process_rows);
    together they are the single-process batch, also where a share of the last eval batch is empty."""
    processor = PaliGemmaProcessor(PaliGemmaTokenizer(tokenizer_dir), 16, 16)
    images = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(5)]
    data = Dataset([Example(image, "caption en", f"shape {i}") for i, image in enumerate(images)], processor)
    shares = ([0, 1], [2, 3])
    key = np.array([0, 7], np.uint32)
    whole = data.train_batch(3, 4, key)
    parts = [data.train_batch(3, 4, key, rows) for rows in shares]
    for name, value in whole.items():
        assert np.array_equal(np.concatenate([p[name] for p in parts]), value), name
    whole = list(data.eval_batches(4))  # 5 examples: the second batch holds one, and 3 empty rows
    parts = [list(data.eval_batches(4, rows)) for rows in shares]
    for batch, (first, second) in zip(whole, zip(*parts)):
        for name, value in batch.items():
            assert np.array_equal(np.concatenate([first[name], second[name]]), value), name
    assert not parts[1][1]["loss_mask"].any()  # the second share of the last batch: no example at all


@pytest.mark.parametrize("extra, message", [
    (["--trainable", "lora"], "needs lora_rank"),
    (["--batch-size", "6", "--accum-steps", "4"], "multiple of accum_steps"),
    (["--steps", "0"], "steps must be positive"),
    (["--trainable", "bogus"], "invalid choice"),
    (["--mesh", "fsdp=64"], "needs 64 devices"),
    (["--mesh", "fsdp=x"], "'x' is not an integer"),
])
def test_bad_arguments_are_one_line_errors(model_dir, data_dir, tmp_path, capsys, extra, message):
    code, _, stderr = run(capsys, "--model", model_dir, "--train", data_dir / "train.jsonl", "--out", tmp_path, *extra)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_missing_model_is_a_one_line_error(data_dir, tmp_path, capsys):
    code, _, stderr = run(capsys, "--model", tmp_path / "nothing-here", "--train", data_dir / "train.jsonl",
                          "--out", tmp_path / "run")
    assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", sorted(BAD_DATA_LINES))
def test_finetune_stops_at_a_bad_line(checkpoint, data, tmp_path, capsys, case):
    line, message = BAD_DATA_LINES[case]
    train = _data_file(data, line, f"train-{abs(hash(case))}.jsonl")
    out = tmp_path / "run"
    code, stdout, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", out], capsys)
    assert_one_line_error(code, err, f"{train}:3: ")
    assert message in err and not out.exists()


def test_a_suffix_longer_than_the_positions_names_its_line(checkpoint, data, tmp_path, capsys):
    train = _data_file(data, _line(suffix=LONG_TEXT), "long.jsonl")
    code, _, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", tmp_path / "run"],
                        capsys)
    assert_one_line_error(code, err, f"{train}:3: ")
    assert "exceed the model's positions 8192" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    ("", "holds no usable example"),
    ("\n\n  \n", "holds no usable example"),
    (b"\xff\xfe\x00binary", "cannot read data file"),
    ("folder", "cannot read data file"),
])
def test_finetune_refuses_data_files(checkpoint, tmp_path, capsys, content, message):
    train = tmp_path / "train.jsonl"
    if content == "folder":
        train.mkdir()
    elif isinstance(content, bytes):
        train.write_bytes(content)
    elif content is not None:
        train.write_text(content)
    code, _, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", tmp_path / "run"],
                        capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--lr=-1e-3"], "--lr must be a finite positive number"),
    (["--lr", "0"], "--lr must be a finite positive number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite non-negative number, got nan"),
    (["--weight-decay=-0.1"], "--weight-decay must be a finite non-negative number"),
    (["--momentum", "inf"], "--momentum must be a finite"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite"),
    (["--label-smoothing", "nan"], "--label-smoothing must be a finite"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be below 1"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--max-length", "100000"], "max_length 100000 exceeds the model's 8192 positions"),
    (["--max-length", "0"], "--max-length must be positive"),
    (["--keep", "0"], "--keep must be positive"),
    (["--quantize", "int8"], "--quantize trains LoRA adapters on a frozen quantized base: it needs --trainable lora, "
                             "not --trainable all"),
    (["--quantize", "int8", "--train-pattern", "llm/"], "not --train-pattern"),
    (["--trainable", "lora", "--lora-rank", "2", "--quantize", "int3"], "unknown quantization 'int3'; use int8 or int4"),
    (["--trainable", "lora", "--lora-rank", "2", "--quantize", "int4", "--group-size", "0"], "group size must be"),
    (["--trainable", "lora", "--lora-rank", "2", "--quantize", "int4", "--group-size", "48"],
     "int4 group size 48 does not divide"),
    (["--export-adapters-apart"], "--export-adapters-apart keeps LoRA adapters apart"),
])
def test_finetune_refuses_settings(checkpoint, data, tmp_path, capsys, extra, message):
    train = _data_file(data, GOOD_LINE, "good.jsonl")
    code, _, err = call(finetune_main, ["--model", checkpoint["converted"], "--train", train, "--out", tmp_path / "run",
                                        *extra], capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["out is a file", "out under a read-only folder", "model is the export target"])
def test_finetune_refuses_outputs(checkpoint, data, tmp_path, capsys, case):
    train = _data_file(data, GOOD_LINE, "good.jsonl")
    model = checkpoint["converted"]
    if case == "out is a file":
        out = tmp_path / "run"
        out.write_text("x")
        message = "exists and is not a directory"
    elif case == "out under a read-only folder":
        out, message = READ_ONLY / "pali-jax-run", "is not a writable folder"
    else:  # --out RUN with --model RUN/model: the export would replace the weights being trained
        out = tmp_path / "run"
        shutil.copytree(checkpoint["converted"], out / "model")
        model, message = out / "model", "is or contains the source"
    before = listing(tmp_path)
    code, _, err = call(finetune_main, ["--model", model, "--train", train, "--out", out, "--steps", 2], capsys)
    assert_one_line_error(code, err, message)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("changed, message", [
    (["--lr", "2e-3"], "learning_rate: 0.001 -> 0.002"),
    (["--steps", "40"], "steps: 20 -> 40"),
    (["--lr", "2e-3", "--batch-size", "2"], "batch_size: 4 -> 2; learning_rate: 0.001 -> 0.002"),
])
def test_resume_with_other_settings_is_refused(checkpoint, data, tmp_path, capsys, changed, message):
    train = _data_file(data, GOOD_LINE, "good.jsonl")
    out = tmp_path / "run"
    (out / "checkpoints" / "10").mkdir(parents=True)
    base = ["--model", checkpoint["converted"], "--train", train, "--out", out, "--steps", 20, "--batch-size", 4,
            "--lr", "1e-3"]
    saved = finetune._train_config(finetune.parse_args([str(a) for a in base]))
    import dataclasses
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    before = (out / "train_config.json").read_text()
    code, _, err = call(finetune_main, [*base, *changed, "--resume"], capsys)
    assert_one_line_error(code, err, "--resume with settings that differ from")
    assert message in err and (out / "train_config.json").read_text() == before


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return kill_points.make_shapes_data(tmp_path_factory.mktemp("shapes"))


def test_finetune_interrupted_then_resumed_gives_the_uninterrupted_result(shapes_data, tmp_path):
    """Ctrl-C in the middle of fine-tuning: one line, exit 130; --resume then ends with the
    uninterrupted run's loss and exported weights."""
    reference = kill_points.finetune_reference(kill_points.DEMO_MODEL, shapes_data, tmp_path / "reference")
    record = kill_points.finetune_trial(kill_points.DEMO_MODEL, shapes_data, tmp_path / "run", 0.7 * reference[0],
                                        signal.SIGINT, reference)
    assert record["problems"] == [], record
    assert record["exit"] in (0, 130) and record["max_rel_weight_diff"] <= 1e-6


def test_a_diverging_loss_stops_in_one_line(shapes_data, tmp_path):
    """--lr 1e30 is finite, so it passes the checks; the loss then becomes NaN/inf, which stops the
    run (exit 2, the step named) before a NaN checkpoint or export is written. --resume on a run
    directory without checkpoints says that it starts from step 0."""
    out = tmp_path / "run"
    proc = subprocess.run(
        kill_points.finetune_command(kill_points.DEMO_MODEL, shapes_data, out, "--lr", "1e30", "--resume"),
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=kill_points._env(),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == f"warning: --resume: no checkpoint in {out / 'checkpoints'} yet, starting from step 0"
    assert lines[-1].startswith("error: the loss became") and "lower --lr" in lines[-1], lines
    assert not (out / "model").exists()
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()] if (out / "checkpoints").exists() else []
    step = int(lines[-1].split(" at step ")[1].split()[0])
    assert all(int(s) < step for s in saved)
