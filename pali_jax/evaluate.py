"""Score a model (or a file of its answers) with PaliGemma's published metrics.

    python -m pali_jax.evaluate --model MODEL --data val.jsonl --task caption --out metrics.json
    python -m pali_jax.evaluate --predictions answers.jsonl --data val.jsonl --task vqa --out metrics.json

Tasks and their figures (each beside `count`; the definitions are in `pali_jax.metrics`):

    caption       cider, bleu4, rouge_l            references: "references": [...] (or "suffix")
    vqa           accuracy (VQAv2), exact_match    "answers": [...] (or "suffix"); optional "answer_type"
    docvqa        anls, exact_match                "answers": [...] (or "suffix")
    refcoco       acc@0.5, acc@0.75                "boxes": [{"xmin","ymin","xmax","ymax","label"}] (the first)
    detection     map, map50                       "boxes": [...] (every one)
    segmentation  miou, ciou                       "mask": a mask image beside the data file

Reference lines are the fine-tuning JSONL's ({"image", "prefix" or "prompt", ...}); a COCO
annotation file (.json: images, annotations with captions or bboxes, categories) is read for
caption and detection. With --model, the answers come from the dataset job (`pali_jax.annotate`:
continuous batching) into a resumable predictions file beside the metrics (`metrics.predictions.jsonl`
for `metrics.json`), then are scored; detection boxes are scored by their tokens' probability under
the model. With --predictions, a dataset job's file is scored without a model, each line matched
to its reference by image and prompt. The metrics file is written atomically; bad input stops
before anything is written, with one line on stderr (exit 2).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m pali_jax.evaluate: `pali-jax evaluate`, which catches Ctrl-C from here on
    from pali_jax.cli import console

    sys.exit(console("evaluate"))

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pali_jax import metrics
from pali_jax.data import outside_path
from pali_jax.errors import UserError
from pali_jax.files import check_output, jsonl_records, write_text_atomically

if TYPE_CHECKING:
    from pali_jax.pretrained import PaliGemma
    from pali_jax.segmentation import MaskDecoder

TASKS = ("caption", "vqa", "docvqa", "refcoco", "detection", "segmentation")
# The reference field of each task (None: read from "suffix" when the line has no such field).
_FIELD = {"caption": "references", "vqa": "answers", "docvqa": "answers", "refcoco": "boxes", "detection": "boxes",
          "segmentation": "mask"}
_DEFAULT_PROMPT = {"caption": "caption en"}
MAX_NEW_TOKENS = {"caption": 64, "vqa": 16, "docvqa": 32, "refcoco": 16, "detection": 128, "segmentation": 40}


@dataclasses.dataclass(frozen=True)
class Reference:
    """What one answer is scored against. `image` is the path as the dataset job names it (the
    data file's folder joined to the line's path); `texts`: captions or human answers; `boxes`:
    ((xmin, ymin, xmax, ymax) pixels, label); `mask`: the mask file."""

    image: str
    prompt: str
    texts: tuple[str, ...] = ()
    boxes: tuple[tuple[metrics.Box, str], ...] = ()
    mask: str | None = None
    answer_type: str | None = None
    source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return os.path.normpath(self.image), self.prompt


# -- references ----------------------------------------------------------------------------------
def _box(value: Any, where: str) -> tuple[metrics.Box, str]:
    names = ("xmin", "ymin", "xmax", "ymax")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (isinstance(value, dict) and all(number(value.get(k)) for k in names)):
        raise UserError(f'{where}: each box must be {{"xmin", "ymin", "xmax", "ymax", "label"}} in pixels')
    label = value.get("label", "")
    if not isinstance(label, str):
        raise UserError(f"{where}: a box's label must be a string")
    return tuple(float(value[k]) for k in names), label.strip()


def _strings(value: Any, field: str, where: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise UserError(f"{where}: field {field!r} must be a non-empty list of strings")
    return tuple(value)


def _reference(record: dict, task: str, base: Path, where: str, allow_outside: bool) -> Reference:
    if not isinstance(record.get("image"), str):
        raise UserError(f'{where}: expected a JSON object with an "image" path')
    prompt = record.get("prompt", record.get("prefix", _DEFAULT_PROMPT.get(task)))
    if not isinstance(prompt, str):
        raise UserError(f'{where}: no prompt (a "prefix" or "prompt" string)')
    if not allow_outside and (outside := outside_path("image", record["image"])):
        raise UserError(f"{where}: {outside}")
    field = _FIELD[task]
    others = sorted({_FIELD[t] for t in TASKS if _FIELD[t] != field and _FIELD[t] in record})
    if field not in record and others:
        raise UserError(f"{where}: the line gives {others[0]!r}, a reference of another task than --task {task} "
                        "(one task per evaluation)")
    fields: dict[str, Any] = {}
    if task in ("caption", "vqa", "docvqa"):
        texts = record.get(field)
        if texts is None and isinstance(record.get("suffix"), str) and record["suffix"].strip():
            texts = [record["suffix"]]
        if texts is None:
            raise UserError(f"{where}: no reference: give {field!r} (a list of strings) or a \"suffix\"")
        fields["texts"] = _strings(texts, field, where)
        answer_type = record.get("answer_type")
        fields["answer_type"] = answer_type if isinstance(answer_type, str) else None
    elif task in ("refcoco", "detection"):
        boxes = record.get("boxes")
        if not isinstance(boxes, list) or (task == "refcoco" and not boxes):
            raise UserError(f'{where}: no reference: give "boxes" (a list of {{"xmin", "ymin", "xmax", "ymax", '
                            '"label"}} in pixels)')
        fields["boxes"] = tuple(_box(b, where) for b in boxes)
    else:
        mask = record.get("mask")
        if not isinstance(mask, str):
            raise UserError(f'{where}: no reference: give "mask" (a mask image beside the data file)')
        if not allow_outside and (outside := outside_path("mask", mask)):
            raise UserError(f"{where}: {outside}")
        fields["mask"] = str(base / mask)
    return Reference(str(base / record["image"]), prompt, source=where, **fields)


def read_references(path: str | os.PathLike, task: str, *, prompt: str | None = None,
                    allow_outside: bool = False) -> list[Reference]:
    """The references of a JSONL data file (one line per answer) or a COCO annotation file (.json)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    path = Path(path)
    if path.suffix == ".json":
        return _coco_references(path, task, prompt)
    refs = []
    for where, record in jsonl_records(path, "references file"):
        if not isinstance(record, dict):
            raise UserError(f'{where}: expected a JSON object with an "image" path')
        if prompt is not None:
            record = {**record, "prompt": prompt}
        refs.append(_reference(record, task, path.parent, where, allow_outside))
    if not refs:
        raise UserError(f"{path} holds no reference")
    seen: dict[tuple[str, str], str] = {}
    for ref in refs:
        if ref.key in seen:
            raise UserError(f"{ref.source}: the same image and prompt as {seen[ref.key]}: answers are matched by both")
        seen[ref.key] = ref.source
    return refs


def _coco_references(path: Path, task: str, prompt: str | None) -> list[Reference]:
    """A COCO annotation file: captions (caption) or bboxes with categories (detection). The detection
    prompt, unless given, names every category: "detect cat ; dog"."""
    if task not in ("caption", "detection"):
        raise UserError(f"{path}: a COCO annotation file gives captions or boxes, not --task {task} references")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        coco = json.loads(text)
        images = {im["id"]: im["file_name"] for im in coco["images"]}
        annotations = coco["annotations"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a COCO annotation file (images with id and file_name, annotations)") from None
    per_image: dict[Any, list] = {i: [] for i in images}
    try:
        if task == "caption":
            for a in annotations:
                per_image[a["image_id"]].append(str(a["caption"]))
            refs = [Reference(str(path.parent / images[i]), prompt or "caption en", texts=tuple(c), source=f"{path}")
                    for i, c in per_image.items() if c]
        else:
            names = {c["id"]: c["name"] for c in coco["categories"]}
            for a in annotations:
                x, y, w, h = (float(v) for v in a["bbox"])
                per_image[a["image_id"]].append(((x, y, x + w, y + h), names[a["category_id"]]))
            default = "detect " + " ; ".join(sorted(set(names.values())))
            refs = [Reference(str(path.parent / images[i]), prompt or default, boxes=tuple(b), source=f"{path}")
                    for i, b in per_image.items()]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: an annotation names an unknown image or category, or lacks its "
                        f"{'caption' if task == 'caption' else 'bbox'}") from None
    if not refs:
        raise UserError(f"{path} holds no reference")
    return refs


# -- predictions ---------------------------------------------------------------------------------
def read_predictions(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """The dataset job's lines of a predictions file, by (image, prompt)."""
    out = {}
    for where, record in jsonl_records(path, "predictions file"):
        if not (isinstance(record, dict) and isinstance(record.get("image"), str)
                and isinstance(record.get("prompt"), str) and isinstance(record.get("text"), str)):
            raise UserError(f"{where}: not a prediction line (JSON with image, prompt and text)")
        out[os.path.normpath(record["image"]), record["prompt"]] = record
    return out


def match(references: Sequence[Reference], predictions: dict[tuple[str, str], dict], source: str) -> list[dict]:
    """The prediction of each reference, in order; refuses a file that misses some or answers other items."""
    found = [predictions.get(ref.key) for ref in references]
    missing = [ref for ref, p in zip(references, found) if p is None]
    if len(missing) == len(references):
        first = next(iter(predictions), None)
        raise UserError(f"{source} answers none of the references (other data? its first line is for "
                        f"{first[0] if first else 'nothing'!r}, the references' first image is "
                        f"{references[0].image!r})")
    if missing:
        raise UserError(f"{source} has no answer for {len(missing)} of {len(references)} references "
                        f"(first: {missing[0].source}, {missing[0].image!r} / {missing[0].prompt!r})")
    extra = len(predictions) - len(references)
    if extra > 0:
        raise UserError(f"{source} answers {extra} item(s) the references do not hold: predictions of other data")
    return found


# -- scoring -------------------------------------------------------------------------------------
def _pred_box(box: dict) -> metrics.Box:
    return float(box["xmin"]), float(box["ymin"]), float(box["xmax"]), float(box["ymax"])


def score(task: str, references: Sequence[Reference], predictions: Sequence[dict], *,
          caption_tokenizer: str = "auto") -> dict[str, Any]:
    """The task's figures for answers (dataset-job records: text, boxes with "score" / "mask") in
    the order of `references`."""
    texts = [p["text"] for p in predictions]
    if task == "caption":
        return metrics.caption_metrics(texts, [r.texts for r in references], caption_tokenizer)
    if task in ("vqa", "docvqa"):
        exact = float(np.mean([t.strip() in {a.strip() for a in r.texts} for t, r in zip(texts, references)]))
        if task == "docvqa":
            return {"anls": float(np.mean([metrics.anls(t, r.texts) for t, r in zip(texts, references)])),
                    "exact_match": exact, "count": len(references)}
        acc = [metrics.vqa_accuracy(t, r.texts) for t, r in zip(texts, references)]
        out: dict[str, Any] = {"accuracy": float(np.mean(acc)), "exact_match": exact, "count": len(references)}
        types = [r.answer_type for r in references]
        if any(types):
            out["accuracy_by_answer_type"] = metrics.mean_by(acc, [t or "other" for t in types])
        return out
    if task == "refcoco":
        boxes = [_pred_box(p["boxes"][0]) if p.get("boxes") else None for p in predictions]
        return metrics.grounding_metrics(boxes, [r.boxes[0][0] for r in references])
    if task == "detection":
        preds = [[(_pred_box(b), str(b.get("label", "")).strip(), float(b.get("score", 1.0)))
                  for b in p.get("boxes", [])] for p in predictions]
        return metrics.detection_map([r.boxes for r in references], preds)
    from pali_jax.segmentation import load_mask, rle_decode

    masks = []  # the first box's mask, decoded by the dataset job (--seg-vae); none: a miss
    for p in predictions:
        first = p["boxes"][0] if p.get("boxes") else {}
        masks.append(rle_decode(first["mask"]) if isinstance(first.get("mask"), dict) else None)
    return metrics.mask_metrics(masks, [load_mask(r.mask) for r in references])


# -- box scores under the model ------------------------------------------------------------------
def box_scores(token_ids: Sequence[int], logprobs: Sequence[float], is_loc: Callable[[int], bool]) -> list[float]:
    """Each box's probability: exp of the summed log-probabilities of its tokens, from its first
    `<loc>` to the next box (its label and separator included; the end token not). A box is four
    `<loc>` tokens in a row, as `parse_detections` reads them."""
    starts, i = [], 0
    while i + 4 <= len(token_ids):
        if all(is_loc(t) for t in token_ids[i:i + 4]):
            starts.append(i)
            i += 4
        else:
            i += 1
    ends = [*starts[1:], len(token_ids)]
    return [float(np.exp(np.sum(logprobs[s:e]))) for s, e in zip(starts, ends)]


def teacher_forced_logprobs(pg: "PaliGemma", records: Sequence[dict], batch_size: int = 16) -> list[np.ndarray]:
    """Each record's generated tokens' log-probabilities given its image and prompt (one forward pass
    per batch, right-padded to one length)."""
    import jax

    from pali_jax.processor import load_image, preprocess_images

    cfg, tok = pg.config, pg.tokenizer
    rows = []
    for r in records:
        ids, types = tok.encode_example(r["prompt"], num_image_tokens=cfg.num_image_tokens)
        rows.append((ids + list(r["token_ids"]), types + [1] * len(r["token_ids"]), len(ids)))
    length = max(len(ids) for ids, _, _ in rows)
    out = []
    for start in range(0, len(rows), batch_size):
        part, recs = rows[start:start + batch_size], records[start:start + batch_size]
        ids = np.zeros((batch_size, length), np.int32)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for k, (i, t, _) in enumerate(part):
            ids[k, :len(i)], types[k, :len(t)], mask[k, :len(i)] = i, t, 1
        ids[len(part):], types[len(part):], mask[len(part):] = ids[0], types[0], mask[0]  # filler rows
        images = [load_image(r["image"]) for r in recs]
        pixels = preprocess_images(images + images[:1] * (batch_size - len(images)), cfg.image_size).astype(pg.dtype)
        logp = np.asarray(jax.nn.log_softmax(pg.forward(pixels, ids, types, mask), axis=-1))
        for k, (i, _, n_prompt) in enumerate(part):
            positions = np.arange(n_prompt - 1, len(i) - 1)  # position t predicts token t + 1
            out.append(logp[k, positions, ids[k, positions + 1]])
    return out


def _scored(record: dict, logprobs: np.ndarray, is_loc: Callable[[int], bool]) -> dict:
    """`record` with each box's "score", from its generated tokens' log-probabilities."""
    n = len(logprobs) - (record.get("stop_reason") == "stop_token")  # the end token is no box's
    scores = box_scores(record["token_ids"][:n], logprobs[:n], is_loc)
    boxes = record.get("boxes", [])
    if len(scores) != len(boxes):  # a box the parser skipped: every box gets the answer's probability
        scores = [float(np.exp(np.sum(logprobs[:n])))] * len(boxes)
    return {**record, "boxes": [{**b, "score": s} for b, s in zip(boxes, scores)]}


def add_box_scores(pg: "PaliGemma", records: list[dict]) -> list[dict]:
    """Records whose boxes carry "score" (their tokens' probability under `pg`, teacher-forced)."""
    is_loc = _loc_test(pg)
    return [_scored(r, logp, is_loc) for r, logp in zip(records, teacher_forced_logprobs(pg, records))]


def generate_records(pg: "PaliGemma", references: Sequence[Reference], task: str, *, batch_size: int = 32,
                     max_new_tokens: int | None = None, mask_decoder: "MaskDecoder | None" = None) -> list[dict]:
    """Greedy answers to the references in fixed batches (`PaliGemma.generate`, the trained weights
    as they are: fine-tuning's evaluation), as dataset-job records; detection boxes carry their
    tokens' probability, segmentation boxes their masks (`mask_decoder`, default the model's)."""
    from pali_jax.results_file import box_record

    detection = task == "detection"
    results = pg.generate([r.image for r in references], [r.prompt for r in references], batch_size=batch_size,
                          max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task], output_scores=detection,
                          mask_decoder=mask_decoder)
    records = []
    for ref, result in zip(references, results):
        record = {"image": ref.image, "prompt": ref.prompt, "text": result.text, "token_ids": result.token_ids,
                  "stop_reason": result.stop_reason, "boxes": [box_record(b) for b in result.boxes]}
        records.append(_scored(record, result.logprobs, _loc_test(pg)) if detection else record)
    return records


def _loc_test(pg: "PaliGemma") -> Callable[[int], bool]:
    """Whether a token id is a `<locNNNN>` of the model's tokenizer."""
    sp = pg.tokenizer.sp
    return lambda t: 0 <= t < sp.get_piece_size() and sp.id_to_piece(t).startswith("<loc")


def summary(figures: dict[str, Any]) -> str:
    """The figures of `score` on one line: "cider 1.0234, bleu4 0.4100, ... of 200"."""
    shown = [f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, float)]
    return ", ".join(shown) + f" of {figures['count']}"


# -- files ---------------------------------------------------------------------------------------
def predictions_path(out: str | os.PathLike) -> Path:
    """The predictions file beside a metrics file: metrics.json -> metrics.predictions.jsonl."""
    out = Path(out)
    return out.with_name(out.stem + ".predictions.jsonl")


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str], prog: str = "pali-jax evaluate") -> argparse.Namespace:
    from pali_jax.cli import OneLineParser

    p = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="converted dir, HF checkpoint dir or hub id: answer the data, then score")
    source.add_argument("--predictions", metavar="FILE.jsonl", help="score the dataset job's answers in FILE")
    p.add_argument("--data", required=True, metavar="FILE.jsonl|COCO.json", help="the references")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, metavar="METRICS.json", help="the figures (written atomically)")
    p.add_argument("--prompt", help="the prompt of every item (default: each line's prefix / prompt)")
    p.add_argument("--max-tokens", type=int, help="new tokens at most per answer (default: by task)")
    p.add_argument("--caption-tokenizer", default="auto", choices=metrics.CAPTION_TOKENIZERS,
                   help="ptb: pycocoevalcap's (Java, as big_vision); simple: Python; auto: ptb when Java is there")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--slots", type=int, default=32, help="the dataset job's decode rows")
    p.add_argument("--seg-vae", metavar="PATH",
                   help="big_vision's vae-oid.npz (segmentation; default $PALI_JAX_SEG_VAE)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let data lines name images outside their file's directory (.. or absolute paths)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.max_tokens is not None and not 1 <= args.max_tokens <= 4096:
        p.error(f"--max-tokens must be in [1, 4096], got {args.max_tokens}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Answers (or reads the answers to) the references, scores them, writes --out; returns the figures."""
    out = check_output(args.out, "--out", inputs=[args.data] + ([args.predictions] if args.predictions else []))
    tokenizer = metrics.resolve_caption_tokenizer(args.caption_tokenizer) if args.task == "caption" else None
    references = read_references(args.data, args.task, prompt=args.prompt, allow_outside=args.allow_outside_paths)
    if args.predictions:
        found = match(references, read_predictions(args.predictions), args.predictions)
    else:
        found = _answer(args, references, predictions_path(out))
    figures = score(args.task, references, found, caption_tokenizer=tokenizer or "auto")
    result = {"task": args.task, "data": str(args.data), **figures}
    write_text_atomically(out, json.dumps(result, indent=1) + "\n")
    return result


def _answer(args: argparse.Namespace, references: Sequence[Reference], path: Path) -> list[dict]:
    """The dataset job over the references into `path` (resumed), then its lines in reference order."""
    from pali_jax.annotate import Item, annotate_to_file
    from pali_jax.pretrained import PaliGemma
    from pali_jax.segmentation import resolve_vae_path

    if path.exists():  # a file of other data fails now, not after the model has loaded
        predictions = read_predictions(path)
        unknown = set(predictions) - {ref.key for ref in references}
        if unknown:
            raise UserError(f"{path} holds answers to other data ({len(unknown)} not in {args.data}): "
                            "move it away or choose another --out")
    vae = resolve_vae_path(args.seg_vae)
    if args.task == "segmentation" and vae is None:
        raise UserError("--task segmentation decodes masks with big_vision's VQ-VAE: give --seg-vae vae-oid.npz")
    pg = PaliGemma.from_pretrained(args.model, dtype=args.dtype, mask_decoder=vae)
    items = [Item(ref.image, ref.prompt, name=ref.image, source=ref.source) for ref in references]
    annotate_to_file(pg, items, path, progress=not args.no_progress, slots=args.slots,
                     max_new_tokens=args.max_tokens or MAX_NEW_TOKENS[args.task])
    found = match(references, read_predictions(path), str(path))
    if args.task == "detection":
        found = add_box_scores(pg, found)
    return found


def command(argv: list[str], prog: str = "pali-jax evaluate") -> None:
    """`pali-jax evaluate ARGS` (see the module docstring)."""
    result = run(parse_args(argv, prog))
    print(f"{result['task']}: {summary(result)}", flush=True)
