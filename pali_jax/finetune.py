"""Fine-tune PaliGemma on JSONL data.

    pali-jax finetune --model MODEL --train train.jsonl [--eval eval.jsonl] --out RUN [options]

(`python -m pali_jax.finetune ...` runs the same.)

MODEL is anything `PaliGemma.from_pretrained` loads (a converted directory, an HF checkpoint
directory, a big_vision .npz, a hub id). Data lines are {"image": ..., "prefix": ..., "suffix": ...},
or for segmentation {"image": ..., "prefix": "segment cat", "mask": "cat.png"} with --seg-vae
(see data.py).
The run directory gets:

    RUN/checkpoints/<step>/   full training states (orbax), every --checkpoint-every steps, the last --keep
    RUN/model/                the final model: pali_jax_config.json + params/ + tokenizer.model, which
                              PaliGemma.from_pretrained and pali-jax generate --model load directly

`--resume` continues from the newest checkpoint exactly as if the run had not stopped (same
batches, same updates). With --eval, every --eval-every steps prints the held-out loss and the
exact-match rate of greedy answers per task (the prompt's first word), and for `detect` prompts
the share of target boxes found with IoU >= 0.5; with --eval-task (caption, vqa, docvqa, refcoco,
detection, segmentation) the task's published metrics instead (`pali_jax.evaluate`: CIDEr, VQA
accuracy, ANLS, box accuracy, mAP, mask IoU), one JSON line per evaluation in
RUN/eval_metrics.jsonl. Mistakes in the input (paths, data lines, settings) print one line on
stderr and exit with code 2.

QLoRA: `--trainable lora --lora-rank R --quantize int8|int4 [--group-size G]` trains the adapters on
a base quantised as it is read (`pali_jax.train`, docs/quantization.md); RUN/model is then the
merged float model, or with `--export-adapters-apart` the quantised base and `lora_adapters.npz`,
which `PaliGemma.from_pretrained` merges as it loads.

`--mesh data=2,fsdp=4` (see pali_jax.sharding) trains on several devices: the model is loaded onto
its shards, the train state lives there (`Trainer(mesh=...)`), each batch is split over the data and
fsdp axes, and checkpoints restore straight to the shards. Multi-host: the same command on every host
(`--distributed` on a Cloud TPU VM pod slice; JAX_COORDINATOR_ADDRESS, Slurm and Open MPI launches
are detected), one mesh over every device. Every process reads the same JSONL files and builds only
its own rows of each batch, so the run computes what one process would; checkpoints are written and
read by all processes together, in a directory they all share (--out); the export is gathered by all
and written by process 0, which alone prints.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m pali_jax.finetune: `pali-jax finetune`, which catches Ctrl-C from here on
    from pali_jax.cli import console

    sys.exit(console("finetune"))

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pali_jax import distributed, lora, quantize, sharding
from pali_jax.backend import training_layout
from pali_jax.cli import OneLineParser, add_quantize_arguments, warn
from pali_jax.checkpoint import TrainCheckpointer
from pali_jax.config import PaliGemmaConfig
from pali_jax.data import Dataset, Example, read_jsonl
from pali_jax.detection import parse_detections
from pali_jax.errors import UserError
from pali_jax.evaluate import TASKS, Reference, generate_records, read_references, score, summary
from pali_jax.files import write_text_atomically
from pali_jax.metrics import CAPTION_TOKENIZERS, box_iou, resolve_caption_tokenizer
from pali_jax.model_dir import check_destination, is_model_dir, read_quantization, write_model_dir
from pali_jax.pretrained import PaliGemma
from pali_jax.processor import PaliGemmaProcessor
from pali_jax.quantize import DEFAULT_GROUP_SIZE, Quantization
from pali_jax.segmentation import resolve_vae_path
from pali_jax.train import OPTIMIZERS, SCHEDULES, TRAINABLE_PRESETS, Trainer, TrainConfig, TrainState
from pali_jax.weights import DTYPES

_IOU_THRESHOLD = 0.5
EVAL_METRICS = "eval_metrics.jsonl"  # in the run directory: one line per evaluation with --eval-task


# -- export ------------------------------------------------------------------------------------
def export_model(
    dst: str | Path, config: PaliGemmaConfig, params: Any, source: str | Path | None, dtype: str = "float32",
    *, quant: Quantization | None = None, adapters: Any = None,
) -> Path:
    """Writes a model directory in the converted layout (pali_jax_config.json, params/, and the
    tokenizer files of `source`), atomically: `dst` is replaced whole or left as it was. Parameters
    on a mesh are gathered and saved as host arrays, so the directory loads on any devices.

    quant: how `params` is quantised (its integers and scales are written as they are, the other
    leaves in `dtype`). adapters: LoRA adapters kept apart from `params` (`lora.ADAPTERS_FILE`,
    merged by `PaliGemma.from_pretrained` as it loads the directory).

    In a multi-host run every process calls it (the gather is collective), process 0 writes, and
    no process returns before the directory is complete."""
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; use float32 or bfloat16")
    dst = Path(dst)
    host = jax.tree_util.tree_map_with_path(
        lambda path, x: distributed.to_host(x, None if quantize.is_quantized_leaf(path) else DTYPES[dtype]), params)
    extra = None if adapters is None else jax.tree.map(lambda x: distributed.to_host(x, np.float32), adapters)
    try:
        if jax.process_index() == 0:
            with tempfile.TemporaryDirectory(prefix="pali-jax-adapters-") as tmp:
                files = {}
                if extra is not None:
                    files[lora.ADAPTERS_FILE] = Path(tmp) / lora.ADAPTERS_FILE
                    lora.save(files[lora.ADAPTERS_FILE], extra)
                write_model_dir(dst, config, host, source, files, quant=quant)
    finally:
        distributed.wait_for_every_process(f"export {dst}")
    return dst


# -- evaluation by generation ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskMetrics:
    """Greedy-generation scores of the examples of one task (prompts sharing their first word)."""

    count: int
    exact_match: float  # share of answers equal to the target (whitespace-trimmed)
    boxes: int = 0  # target boxes (detection prompts)
    box_iou50: float = 0.0  # share of target boxes matched by a predicted box of the same label with IoU >= 0.5
    mean_iou: float = 0.0

    def summary(self) -> str:
        text = f"exact {self.exact_match:.1%} of {self.count}"
        return text + (f", IoU>=0.5 {self.box_iou50:.1%} of {self.boxes} boxes" if self.boxes else "")


def _best_ious(predicted: str, target: str) -> list[float]:
    """For each box of `target`, the best IoU of a predicted box with the same label (0 if none)."""
    corners = lambda d: (d.xmin, d.ymin, d.xmax, d.ymax)  # noqa: E731
    pred = parse_detections(predicted, 1024, 1024)
    return [max((box_iou(corners(p), corners(t)) for p in pred if p.label == t.label), default=0.0)
            for t in parse_detections(target, 1024, 1024)]


def evaluate_generation(
    pg: PaliGemma, examples: Sequence[Example], *, batch_size: int = 32, max_new_tokens: int | None = None
) -> dict[str, TaskMetrics]:
    """Greedy answers to `examples`, scored per task (the prompt's first word: caption, answer, detect...).

    max_new_tokens: default one more than the longest target (its EOS).
    """
    tok = pg.tokenizer
    if max_new_tokens is None:
        max_new_tokens = max(len(tok.encode(e.suffix)) for e in examples) + 1
    results = pg.generate([e.image for e in examples], [e.prefix for e in examples],
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
    by_task: dict[str, list[tuple[bool, list[float]]]] = {}
    for example, result in zip(examples, results):
        task = example.prefix.split(maxsplit=1)[0] if example.prefix.strip() else ""
        ious = _best_ious(result.text, example.suffix) if "<loc" in example.suffix else []
        by_task.setdefault(task, []).append((result.text.strip() == example.suffix.strip(), ious))
    metrics = {}
    for task, rows in sorted(by_task.items()):
        ious = [iou for _, row_ious in rows for iou in row_ious]
        metrics[task] = TaskMetrics(
            count=len(rows), exact_match=float(np.mean([ok for ok, _ in rows])), boxes=len(ious),
            box_iou50=float(np.mean([iou >= _IOU_THRESHOLD for iou in ious])) if ious else 0.0,
            mean_iou=float(np.mean(ious)) if ious else 0.0,
        )
    return metrics


def task_figures(pg: PaliGemma, references: Sequence[Reference], task: str, batch_size: int,
                 caption_tokenizer: str = "auto", mask_decoder: Any = None) -> dict[str, Any]:
    """The published metrics of `task` (`pali_jax.evaluate.score`) for greedy answers to `references`
    (segmentation: masks decoded by `mask_decoder`, the run's --seg-vae)."""
    records = generate_records(pg, references, task, batch_size=batch_size, mask_decoder=mask_decoder)
    return {"task": task, **score(task, references, records, caption_tokenizer=caption_tokenizer)}


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON line at the end of `path`, flushed and synced (a run's record of its evaluations)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def eval_loss(trainer: Trainer, state: TrainState, data: Dataset) -> float:
    """The training loss over every example of `data`, in batches of the run's batch size (each
    process builds its own rows of each)."""
    total = weight = 0.0
    for batch in data.eval_batches(trainer.train_config.batch_size, trainer.process_rows()):
        t, w = trainer.eval_terms(state, batch)
        total, weight = total + t, weight + w
    return total / max(weight, 1.0)


# -- the loop ----------------------------------------------------------------------------------
def _speaks() -> bool:
    """Whether this process prints: every process of a multi-host run runs the same loop, the first speaks."""
    return jax.process_index() == 0


def _say(message: str, *, stdout: bool = False) -> None:
    """Prints `message` (on stderr, or stdout) from the first process only."""
    if _speaks():
        print(message, file=sys.stdout if stdout else sys.stderr)


def _warn(message: str) -> None:
    """A skipped data line, reported once (by the first process)."""
    if _speaks():
        warn(message)


def fit(
    trainer: Trainer,
    state: TrainState,
    data: Dataset,
    *,
    checkpointer: TrainCheckpointer | None = None,
    evaluate: Callable[[TrainState], str] | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains from `state.step` to `train_config.steps`. Returns the final state and one record per
    step (step, loss, grad_norm, learning_rate). `evaluate(state)` runs before the first step (a
    baseline), every `eval_every` steps (0: never) and at the end; its line is printed above the
    progress bar. In a multi-host run every process calls it, each building its own rows of every
    batch (`Trainer.process_rows`); process 0 alone shows the progress and the evaluations."""
    from tqdm import tqdm

    t = trainer.train_config
    start = int(state.step)
    key, rows = np.asarray(state.rng), trainer.process_rows()
    history: list[dict[str, float]] = []
    bar = tqdm(total=t.steps, initial=start, unit="step", disable=not (progress and _speaks()), file=sys.stderr,
               dynamic_ncols=True)

    def report(step: int, state: TrainState) -> None:
        """Evaluates `state` and prints the line above the progress bar."""
        line = f"step {step}: {evaluate(state)}"  # on every process: evaluating is collective
        if _speaks():
            bar.write(line, file=sys.stderr)

    if evaluate is not None and start == 0:
        report(0, state)
    batch = trainer.place_batch(data.train_batch(start, t.batch_size, key, rows)) if start < t.steps else None
    for step in range(start + 1, t.steps + 1):
        state, metrics = trainer.step(state, batch)
        if step < t.steps:  # build the next batch while the step runs (dispatch is asynchronous)
            batch = trainer.place_batch(data.train_batch(step, t.batch_size, key, rows))
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if not math.isfinite(record["loss"]):
            bar.close()
            kept = checkpointer.latest_step() if checkpointer is not None else None
            raise UserError(
                f"the loss became {record['loss']} at step {step} (learning rate {record['learning_rate']:.3g}): "
                f"lower --lr or check the data; " + (f"the last checkpoint is step {kept}" if kept else "no checkpoint was written")
            )
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}", refresh=False)
        bar.update()
        if checkpointer is not None:
            checkpointer.save(step, state, force=step == t.steps)
        if evaluate is not None and (step == t.steps or (eval_every and step % eval_every == 0)):
            report(step, state)
    bar.close()
    return state, history


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None, prog: str = "pali-jax finetune") -> argparse.Namespace:
    p = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="converted dir, HF checkpoint dir or hub id")
    p.add_argument("--train", required=True, help="training data (JSONL)")
    p.add_argument("--eval", help="held-out data (JSONL) for loss and generation metrics")
    p.add_argument("--out", required=True, help="run directory (checkpoints/, model/)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer updates")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--accum-steps", type=int, default=1, help="microbatches per update (gradient accumulation)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0, help="sgd momentum (0: plain SGD)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (0: off)")
    p.add_argument("--trainable", default="all", choices=tuple(TRAINABLE_PRESETS), help="what trains")
    p.add_argument("--train-pattern", action="append", metavar="REGEX",
                   help="train the parameters whose path (e.g. llm/layers/attn/q_einsum) starts with REGEX; "
                        "repeatable; replaces --trainable")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (needed by --trainable lora)")
    p.add_argument("--reduction", default="example", choices=("example", "token"),
                   help="loss mean per example then over the batch (big_vision) or over all tokens (transformers)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="activation dtype")
    p.add_argument("--frozen-dtype", default="float32", choices=tuple(DTYPES), help="storage of frozen weights")
    p.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    p.add_argument("--max-length", type=int, help="tokens per example, image tokens included (default: longest)")
    p.add_argument("--skip-bad-lines", action="store_true", help="warn about bad data lines and skip them")
    p.add_argument("--seg-vae", metavar="PATH", help="big_vision's vae-oid.npz, to encode the masks of data lines "
                                                    "{..., \"mask\": \"m.png\"} into <loc>/<seg> suffixes "
                                                    "(default: $PALI_JAX_SEG_VAE)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let data lines name images outside their file's directory (.. or absolute paths)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-limit", type=int, default=256, help="held-out examples answered by generation")
    p.add_argument("--eval-task", choices=TASKS, help="score the --eval answers with this task's published metrics "
                                                      "(see pali_jax.evaluate); each evaluation's figures also go to "
                                                      "RUN/eval_metrics.jsonl")
    p.add_argument("--caption-tokenizer", default="auto", choices=CAPTION_TOKENIZERS,
                   help="--eval-task caption: ptb (pycocoevalcap, Java), simple (Python), auto (ptb with Java)")
    p.add_argument("--export-dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--export-adapters-apart", action="store_true",
                   help="LoRA: export the base as trained on (quantised with --quantize) and the adapters beside it "
                        "(lora_adapters.npz) instead of merging them into float weights; loading merges them")
    add_quantize_arguments(p)  # QLoRA: --trainable lora on a frozen base quantised as it is read
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    sharding.add_mesh_arguments(p)
    args = p.parse_args(argv)
    for name in ("max_length", "eval_every", "eval_limit", "checkpoint_every", "keep"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    # argparse's float() takes "nan" and "inf": either trains NaN weights and exports them.
    for name, low in (("lr", "positive"), ("weight_decay", "nonneg"), ("momentum", "nonneg"),
                      ("grad_clip", "nonneg"), ("label_smoothing", "nonneg")):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (low == "positive" and value == 0):
            p.error(f"--{name.replace('_', '-')} must be a finite {'positive' if low == 'positive' else 'non-negative'} "
                    f"number, got {value}")
    if args.label_smoothing >= 1:
        p.error(f"--label-smoothing must be below 1, got {args.label_smoothing}")
    if args.eval_task and not args.eval:
        p.error("--eval-task scores the answers to --eval: give --eval too")
    try:
        quant = quantize.parse(args.quantize, args.group_size)
    except UserError as e:
        p.error(str(e))
    if quant is not None and (args.train_pattern or args.trainable != "lora"):
        what = "--train-pattern" if args.train_pattern else f"--trainable {args.trainable}"
        p.error(f"--quantize trains LoRA adapters on a frozen quantized base: it needs --trainable lora, not {what}")
    if args.export_adapters_apart and (args.lora_rank <= 0 or args.trainable != "lora" or args.train_pattern):
        p.error("--export-adapters-apart keeps LoRA adapters apart from a frozen base: it needs --trainable lora "
                "--lora-rank R")
    return args


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, accum_steps=args.accum_steps, optimizer=args.optimizer,
        learning_rate=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, momentum=args.momentum, grad_clip=args.grad_clip or None,
        trainable=tuple(args.train_pattern) if args.train_pattern else args.trainable, lora_rank=args.lora_rank,
        reduction=args.reduction, label_smoothing=args.label_smoothing, frozen_dtype=args.frozen_dtype,
        remat=args.remat, seed=args.seed, quantize=None if args.quantize in (None, "none") else args.quantize,
        group_size=args.group_size,
    )


def _stored_quantization(args: argparse.Namespace, train_config: TrainConfig) -> TrainConfig:
    """`train_config` for a --model directory converted with --quantize: QLoRA on its quantisation
    (the only training it can take) whether or not --quantize repeats it."""
    model = Path(args.model)
    stored = read_quantization(model) if is_model_dir(model) else None
    if stored is None or train_config.quantize is not None:
        return train_config
    if train_config.trainable != "lora":
        raise UserError(f"{model} is quantized ({stored.scheme}): only LoRA adapters train on it "
                        f"(--trainable lora --lora-rank R), or fine-tune its float source")
    group = stored.group_size if stored.scheme == "int4" and stored.group_size != DEFAULT_GROUP_SIZE else None
    return dataclasses.replace(train_config, quantize=stored.scheme, group_size=group)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` leaves behind: the exported model, this invocation's per-step records (step,
    loss, grad_norm, learning_rate; after --resume, the resumed steps only) and, with --eval, the
    evaluations' lines in order (the same on every process of a multi-host run)."""

    model_dir: Path
    history: list[dict[str, float]]
    evaluations: list[str] = dataclasses.field(default_factory=list)


def _existing_checkpoints(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds anything, as every process sees it (checked to agree)."""
    found = ckpt_dir.exists() and any(ckpt_dir.iterdir())
    if not distributed.same_on_every_process(int(found)):
        raise UserError(
            f"the processes see different contents in {ckpt_dir}: --out must be a directory every host shares"
        )
    return found


def _settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`name: saved -> current` for every training setting that differs."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def _check_resume_settings(config_file: Path, train_config: TrainConfig) -> None:
    """Refuses --resume with other settings than the run it continues: the result would be neither
    run, and train_config.json would describe a run that never happened."""
    if not config_file.exists():
        return
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError):
        raise UserError(f"{config_file} is damaged: cannot check that --resume keeps the run's settings") from None
    current = json.loads(json.dumps(dataclasses.asdict(train_config)))  # tuples -> lists, as saved
    changed = _settings_differences(saved, current)
    if changed:
        raise UserError(f"--resume with settings that differ from {config_file}: {'; '.join(changed)} "
                        "(resume with the original settings, or start a new --out)")


def _prepare_out(out: Path, model: str) -> None:
    """Checks --out before any work: a directory (or nothing yet) that can be written, and whose
    `model/` export would not replace the model being fine-tuned."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    # Created only once the inputs are known good (a failed start leaves nothing): check the
    # nearest existing folder on the way instead.
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot create --out {out}: {existing} is not a writable folder")
    if Path(model).exists():
        check_destination(out / "model", model, overwrite=True)


def run(args: argparse.Namespace) -> RunResult:
    """Runs the fine-tuning the arguments describe."""
    mesh = sharding.mesh_from_args(args)  # joins a multi-host run first: before anything touches a device
    train_config = _stored_quantization(args, _train_config(args))
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    if _speaks():
        _prepare_out(out, args.model)
    if _existing_checkpoints(ckpt_dir) and not args.resume:
        raise UserError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
    if args.resume:
        _check_resume_settings(out / "train_config.json", train_config)
    skip = args.skip_bad_lines
    masks = None
    if vae := resolve_vae_path(args.seg_vae):
        from pali_jax.segmentation import MaskDecoder

        masks = MaskDecoder.from_npz(vae)
    read = dict(skip_bad=skip, warn=_warn, allow_outside=args.allow_outside_paths, masks=masks)
    train_examples = read_jsonl(args.train, **read)
    eval_examples = read_jsonl(args.eval, **read) if args.eval else []
    references = (read_references(args.eval, args.eval_task, allow_outside=args.allow_outside_paths)[: args.eval_limit]
                  if args.eval_task else [])
    tokenizer = resolve_caption_tokenizer(args.caption_tokenizer) if args.eval_task == "caption" else "auto"

    # The training layout, so that evaluation can run the trained weights as they are.
    # QLoRA: the base quantised as it is read (the float model is never held whole).
    pg = PaliGemma.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, layout=training_layout(DTYPES[args.dtype]),
                                   quantize=train_config.quantize, group_size=train_config.group_size)
    processor = PaliGemmaProcessor(pg.tokenizer, pg.config.image_size, pg.config.num_image_tokens)
    # An example longer than the model's positions is reported with its line (not allocated);
    # both splits then share one row length, so one train step program serves both.
    datasets = [Dataset(examples, processor, args.max_length, skip_bad=skip, warn=_warn,
                        limit=pg.config.text.max_positions) for examples in (train_examples, eval_examples) if examples]
    for data in datasets:
        data.max_length = max(d.max_length for d in datasets)
    train_data, eval_data = datasets[0], datasets[1] if len(datasets) > 1 else None

    trainer = Trainer(pg.config, train_config, DTYPES[args.dtype], mesh)
    if _speaks():
        out.mkdir(parents=True, exist_ok=True)
    checkpointer = TrainCheckpointer(ckpt_dir, args.checkpoint_every, args.keep)
    if checkpointer.latest_step() is not None:  # only with --resume (checked above)
        state = checkpointer.restore(trainer.abstract_state(pg.params))
        _say(f"resumed from step {int(state.step)} of {ckpt_dir}")
    else:
        if args.resume:  # documented: --resume on a fresh --out starts the run (so a job script can always pass it)
            _say(f"warning: --resume: no checkpoint in {ckpt_dir} yet, starting from step 0")
        state = trainer.init_state(pg.params)
    pg.params = None  # the state holds the weights now; `evaluate` puts the current ones back
    # Evaluation runs the merged weights, float (a quantised base dequantised) while it evaluates.
    eval_pg = dataclasses.replace(pg, layout=dataclasses.replace(pg.layout, quant=None)) if pg.layout.quant else pg
    if _speaks():
        write_text_atomically(out / "train_config.json", json.dumps(dataclasses.asdict(train_config), indent=2))

    evaluate, evaluations = None, []  # evaluations: the lines `evaluate` returned
    if eval_data is not None:
        answered = eval_data.examples[: args.eval_limit]

        def evaluate(state: TrainState) -> str:
            loss = eval_loss(trainer, state, eval_data)
            eval_pg.params = trainer.inference_params(state)
            if references:
                figures = task_figures(eval_pg, references, args.eval_task, train_config.batch_size, tokenizer, masks)
                text = f"{args.eval_task}: {summary(figures)}"
                if _speaks():
                    _append_line(out / EVAL_METRICS, {"step": int(state.step), "eval_loss": loss, **figures})
            else:
                scores = evaluate_generation(eval_pg, answered, batch_size=train_config.batch_size)
                text = "; ".join(f"{task}: {m.summary()}" for task, m in scores.items())
            eval_pg.params = None
            line = f"eval loss {loss:.4f}; {text}"
            evaluations.append(line)
            return line

    t0 = time.perf_counter()
    with checkpointer:
        state, history = fit(trainer, state, train_data, checkpointer=checkpointer, evaluate=evaluate,
                             eval_every=args.eval_every, progress=not args.no_progress)
    if history:
        _say(f"trained steps {history[0]['step']}..{history[-1]['step']} in {time.perf_counter() - t0:.0f} s: "
             f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    if args.export_adapters_apart:
        model_dir = export_model(out / "model", pg.config, state.variables["params"], pg.path, args.export_dtype,
                                 quant=trainer.layout.quant, adapters=state.variables["lora"])
    else:
        model_dir = export_model(out / "model", pg.config, trainer.inference_params(state), pg.path, args.export_dtype)
    _say(f"wrote {model_dir}", stdout=True)
    return RunResult(model_dir, history, evaluations)


def command(argv: list[str], prog: str = "pali-jax finetune") -> None:
    """`pali-jax finetune ARGS` (see the module docstring)."""
    run(parse_args(argv, prog))
