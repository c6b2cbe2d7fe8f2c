"""Caption, answer, detect or segment over a whole dataset: a resumable job with continuous batching.

    pali-jax annotate --model MODEL --images DIR_OR_GLOB_OR_JSONL --prompt "caption en" --out results.jsonl

(`python -m pali_jax.annotate ...` runs the same.)
Images come from a folder, a glob (`"photos/**/*.jpg"`) or a JSONL file whose lines are
{"image": "a.jpg", "prompt": "detect cat", "max_new_tokens": 8} (prompt and max_new_tokens
optional: --prompt and --max-tokens are the defaults; "prefix" is read as the prompt, as in
fine-tuning data). JSONL image paths are relative to the file's folder and may not leave it unless
--allow-outside-paths. Each answer is one JSON line in --out as soon as it is done (image, prompt,
text, token_ids, stop_reason, boxes with masks when --seg-vae is given, timings); a rerun with the
same --out, model and options skips what is there, so a killed job (kill -9 included) resumes
where it stopped; when every item is answered the file is rewritten in input order. --out is only
ever written when it is absent, empty or such a job's results (`results_file`); everything else
(the model, every option, every input line) is checked before it is created. An unreadable image is reported on
stderr with its path and skipped (--stop-on-error ends the run instead). Greedy or sampled
decoding only: beam search runs in fixed batches (pali-jax generate --beams).

Across machines: `--shard K/N` answers every N-th input from the K-th (the same command on each
machine of a job array, K its index), into its own --out; then

    pali-jax annotate --merge part0.jsonl part1.jsonl ... --images ... --prompt ... --out results.jsonl

checks that the files are the complete shards of one job (no model is loaded) and writes them as
one file in input order: the file one unsharded run writes (`--no-timings` leaves out the only
field that differs from run to run). Sampled answers are the same too (each draws with its input
position's key).

From Python: `for record in annotate(pg, ["a.jpg", "b.jpg"], "caption en"): ...` yields the same
records (see `annotate`). The decoding is `continuous.ContinuousDecoder`'s; the input runs ahead
on worker threads (`input_pipeline.Prefetcher`); the file is `results_file.ResultsFile`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m pali_jax.annotate: `pali-jax annotate`, which catches Ctrl-C from here on
    from pali_jax.cli import console

    sys.exit(console("annotate"))

import argparse
import dataclasses
import glob
import inspect
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pali_jax.continuous import MAX_SLOTS, Answer, Counters, Prompt, check_slots, pad_prompt, slot_shape
from pali_jax.data import outside_path
from pali_jax.decode import refuse_records
from pali_jax.detection import parse_detections
from pali_jax.errors import UserError, warn_default
from pali_jax.files import jsonl_records
from pali_jax.generation_config import GenerationConfig, GenerationError
from pali_jax.input_pipeline import MAX_QUEUE, MAX_WORKERS, Failed, Prefetcher, check_sizes
from pali_jax.processor import IMAGE_SUFFIXES, ImageInput, folder_images, image_list, load_image, preprocess_images
from pali_jax.results_file import Key, ResultsFile, box_record, merge_shards, shard_of, shard_share

if TYPE_CHECKING:
    from pali_jax.pretrained import PaliGemma
    from pali_jax.segmentation import MaskDecoder


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to answer. `name` is what the results call it (default: the path; "#i" for an
    in-memory image); `prompt` / `max_new_tokens` None take the job's defaults."""

    image: ImageInput
    prompt: str | None = None
    max_new_tokens: int | None = None
    name: str | None = None
    source: str = ""  # where it was read from, for messages ("data.jsonl:12")


# -- the inputs ----------------------------------------------------------------------------------
def read_items(spec: str, *, allow_outside: bool = False) -> list[Item]:
    """The items of a folder (its image files, sorted), a `.jsonl` file or a glob pattern."""
    path = Path(spec)
    if path.is_dir():
        return [Item(str(p)) for p in folder_images(path)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path, allow_outside)
    found = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise UserError(f"--images {spec}: no such folder or .jsonl file, and no image file matches it as a pattern")
    return [Item(p) for p in found]


def _read_jsonl(path: Path, allow_outside: bool) -> list[Item]:
    items = []
    for where, record in jsonl_records(path, "--images file"):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise UserError(f'{where}: expected a JSON object with an "image" path')
        prompt = record.get("prompt", record.get("prefix"))
        if prompt is not None and not isinstance(prompt, str):
            raise UserError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
        limit = record.get("max_new_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UserError(f"{where}: field 'max_new_tokens' must be an int >= 1, got {limit!r}")
        if not allow_outside and (outside := outside_path("image", record["image"])):
            raise UserError(f"{where}: {outside}")
        items.append(Item(str(path.parent / record["image"]), prompt, limit, source=where))
    if not items:
        raise UserError(f"{path} holds no item")
    return items


def _item_list(items: Iterable[Item | ImageInput] | Item | ImageInput, prompt: str | None) -> list[Item]:
    """`items` checked and as `Item`s; one image or `Item` alone is one item (as in `PaliGemma.generate`)."""
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
    items = [items] if isinstance(items, Item) else image_list(items, "items")
    return [_as_item(item, i, prompt) for i, item in enumerate(items)]


def _as_item(item: Item | ImageInput, position: int, prompt: str | None) -> Item:
    """`item` as an `Item` with its name and prompt (default `prompt`) filled in, checked."""
    item = item if isinstance(item, Item) else Item(item)
    if not isinstance(item.image, ImageInput):
        raise UserError(f"items[{position}] must be an image path, PIL image, numpy array or Item, "
                        f"got {type(item.image).__name__}")
    if item.prompt is not None and not isinstance(item.prompt, str):
        raise UserError(f"items[{position}]: the prompt must be a string, got {type(item.prompt).__name__}")
    name = item.name or (os.fspath(item.image) if isinstance(item.image, (str, os.PathLike)) else f"#{position}")
    item = dataclasses.replace(item, prompt=item.prompt if item.prompt is not None else prompt, name=name)
    if item.prompt is None:
        raise UserError(f"{item.source or name}: no prompt (give --prompt, or a \"prompt\" field)")
    return item


# -- the job -------------------------------------------------------------------------------------
@dataclasses.dataclass
class JobStats:
    """What a job did; pass one to `annotate` to read it afterwards (it fills it in)."""

    answered: int = 0
    skipped: int = 0  # items that could not be prepared (reported through `warn`)
    already_done: int = 0  # in `done` (resumed)
    wall_s: float = 0.0
    decoder: Counters = dataclasses.field(default_factory=Counters)


def annotate(
    pg: "PaliGemma",
    items: Iterable[Item | ImageInput],
    prompt: str | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    slots: int = 32,
    workers: int = 2,
    queue_size: int = 64,
    refill_at: int | None = None,
    spare_slots: int | None = None,
    ordered: bool = True,
    stop_on_error: bool = False,
    mask_decoder: "MaskDecoder | None" = None,
    done: frozenset[Key] | set[Key] = frozenset(),
    shard: tuple[int, int] | None = None,
    timings: bool = True,
    stats: JobStats | None = None,
    warn: Callable[[str], None] = warn_default,
    **options: Any,
) -> Iterator[dict]:
    """Answers every item with continuous batching; yields one record (a JSON-ready dict) each.

    items: paths, PIL images, arrays, or `Item`s (own prompt / max_new_tokens); `prompt` is the
    default prompt. `options` are `GenerationConfig` fields (greedy unless a sampling option is
    given; `beams` > 1 is refused: beam search decodes in fixed batches). slots: decode rows;
    workers / queue_size: the input threads and how many items they prepare ahead; refill_at and
    spare_slots: see `ContinuousDecoder.run` and `continuous.slot_shape`. ordered: records
    in input order (False: as they end). An item that cannot be prepared (unreadable image, prompt
    too long) is passed to `warn` and skipped, or ends the job with `stop_on_error`. `done`:
    (name, prompt) pairs to skip (a resumed job). shard (K, N): answer only every N-th item from the
    K-th (`results_file.shard_share`). timings: put each answer's timings in its record. Sampling
    draws each answer with its own key (the seed and the item's position in `items`): the same job
    gives the same answers, sharded or not. All checks run before the first record is asked for;
    decoding starts then.
    """
    generation = GenerationConfig.resolve(generation_config, options)
    if generation.beams > 1:
        raise GenerationError("beams", f"annotate decodes greedily or by sampling (continuous batching); beams="
                              f"{generation.beams} needs fixed batches: use pali-jax generate --beams or pg.generate")
    refuse_records(generation, "annotate writes text records, not {name}: use pg.generate or pg.generate_ids")
    cfg = pg.config
    generation.check_model(cfg)
    check_sizes(workers, queue_size)
    check_slots(slots)
    if refill_at is not None and (isinstance(refill_at, bool) or not isinstance(refill_at, int)
                                  or not 1 <= refill_at <= slots):
        raise GenerationError("refill_at", f"refill_at must be an int in [1, slots={slots}], got {refill_at!r}")
    all_items = _item_list(items, prompt)
    share = shard_share(len(all_items), shard or (0, 1))
    todo = [(i, dataclasses.replace(item, max_new_tokens=item.max_new_tokens or generation.max_new_tokens))
            for i, item in enumerate(all_items) if i in share and (item.name, item.prompt) not in done]
    own_limits = {item.max_new_tokens: item.source or item.name for _, item in todo
                  if all_items[_].max_new_tokens is not None}
    for limit, source in own_limits.items():
        try:  # a line's own limit: named by its line, not by the job's option
            generation.replace(max_new_tokens=limit).check_model(cfg)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    for limit in {item.max_new_tokens for _, item in todo}:
        generation.replace(max_new_tokens=limit).check_model(cfg)
    stats = JobStats() if stats is None else stats
    stats.already_done = len(share) - len(todo)
    encoded: dict[str, tuple[list[int], list[int]] | str] = {}
    for _, item in todo:
        if item.prompt not in encoded:
            try:
                encoded[item.prompt] = pg.tokenizer.encode_example(item.prompt, num_image_tokens=cfg.num_image_tokens)
            except UserError as e:
                encoded[item.prompt] = str(e)
    lengths = [len(e[0]) for e in encoded.values() if not isinstance(e, str)] or [1]
    shape = slot_shape(cfg, slots, max(lengths), max([item.max_new_tokens for _, item in todo] or [1]), spare_slots)
    pg.continuous.check(shape)
    prepare = _preparer(pg, encoded, generation)
    return _run(pg, todo, prepare, shape, generation, refill_at, ordered, stop_on_error,
                mask_decoder or pg.mask_decoder, stats, warn, workers, queue_size, timings)


def _preparer(pg: "PaliGemma", encoded: dict, generation: GenerationConfig) -> Callable:
    """The workers' function: (position, item) -> (Prompt, image size); a `UserError` names the item."""
    cfg = pg.config

    def prepare(job: tuple[int, Item]) -> tuple[Prompt, tuple[int, int]]:
        position, item = job
        tokens = encoded[item.prompt]
        if isinstance(tokens, str):
            raise UserError(f"{item.source or item.name}: {tokens}")
        try:
            generation.replace(max_new_tokens=item.max_new_tokens).check_prompt_length(cfg, len(tokens[0]))
        except UserError as e:
            raise UserError(f"{item.source or item.name}: {e}") from None
        image = load_image(item.image)
        pixels = preprocess_images([image], cfg.image_size)[0].astype(pg.dtype)
        return Prompt(position, pixels, *pad_prompt(cfg, *tokens), item.max_new_tokens), image.size

    return prepare


def _run(pg, todo, prepare, shape, generation, refill_at, ordered, stop_on_error, decoder, stats, warn, workers,
         queue_size, timings) -> Iterator[dict]:
    t0 = time.perf_counter()
    rank = {position: k for k, (position, _) in enumerate(todo)}  # item position -> its place in `todo`
    prepared: dict[int, tuple[tuple[int, int], float]] = {}  # position -> (image size, prepare_s)
    failed: set[int] = set()  # places in `todo`
    with Prefetcher(prepare, todo, workers=workers, queue_size=queue_size) as prefetcher:

        def next_prompt() -> Prompt | None:
            got = prefetcher.take()
            while isinstance(got, Failed):
                if stop_on_error:
                    raise UserError(f"{got.message} (--stop-on-error: the job stops at the first bad item)")
                warn(f"skipped {got.message}")
                stats.skipped += 1
                failed.add(got.position)
                got = prefetcher.take()
            if got is None:
                return None
            prompt, size = got.value
            prepared[prompt.item] = size, got.prepare_s
            return prompt

        answers = pg.continuous.run(pg.params, shape, next_prompt, generation, refill_at=refill_at,
                                    counters=stats.decoder)
        waiting: dict[int, dict] = {}  # ordered: records that ended before an earlier one
        nxt = 0
        for answer in answers:
            size, prepare_s = prepared.pop(answer.item)
            record = _record(pg, todo[rank[answer.item]][1], answer, size, prepare_s, decoder, timings)
            if not ordered:
                stats.answered += 1
                stats.wall_s = time.perf_counter() - t0
                yield record
                continue
            waiting[rank[answer.item]] = record
            while nxt in waiting or nxt in failed:
                if nxt in waiting:
                    stats.answered += 1
                    stats.wall_s = time.perf_counter() - t0
                    yield waiting.pop(nxt)
                nxt += 1
    stats.wall_s = time.perf_counter() - t0


def _record(pg: "PaliGemma", item: Item, answer: Answer, size: tuple[int, int], prepare_s: float,
            decoder: "MaskDecoder | None", timings: bool = True) -> dict:
    """One result line: what `PaliGemma.generate` gives for the item, as JSON."""
    text = pg.tokenizer.decode(answer.tokens)
    boxes = parse_detections(text, *size)
    if decoder is not None:
        [boxes] = decoder.add_masks([boxes], [size])
    record = {
        "image": item.name, "prompt": item.prompt, "text": text, "token_ids": answer.tokens,
        "stop_reason": answer.stop_reason.name.lower(), "boxes": [box_record(b) for b in boxes],
    }
    if timings:
        record["timings"] = {"prepare_s": round(prepare_s, 4), "latency_s": round(answer.latency_s, 4)}
    return record


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str], prog: str = "pali-jax annotate") -> argparse.Namespace:
    from pali_jax.cli import OneLineParser, add_generation_arguments
    from pali_jax.segmentation import resolve_vae_path

    p = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="converted dir, HF checkpoint dir or hub id (not with --merge)")
    p.add_argument("--images", required=True, metavar="DIR|GLOB|FILE.jsonl", help="what to answer")
    p.add_argument("--prompt", help='default prompt, e.g. "caption en" (JSONL lines may give their own)')
    p.add_argument("--out", required=True, metavar="RESULTS.jsonl", help="results, one line per image; resumed")
    add_generation_arguments(p)
    p.add_argument("--slots", type=int, default=32, help="decode rows, refilled as answers end")
    p.add_argument("--workers", type=int, default=2, help="threads reading and resizing images")
    p.add_argument("--queue-size", type=int, default=64, help="images prepared ahead of the device")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first bad image (default: skip it)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let JSONL lines name images outside their file's directory (.. or absolute paths)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-timings", action="store_true", help="leave each answer's timings out of its line: two "
                                                              "runs of one job then write the same bytes")
    p.add_argument("--shard", metavar="K/N", help="answer every N-th input from the K-th (one machine of N)")
    p.add_argument("--merge", nargs="+", metavar="SHARD.jsonl", help="write the --out of these shards' results "
                                                                     "files, in input order (no model is loaded)")
    args = p.parse_args(argv)
    if args.merge is not None and (args.shard or args.model):
        p.error("--merge takes the shards' results files, --images, --prompt and --out; not --model or --shard")
    if args.merge is None and not args.model:
        p.error("the following arguments are required: --model")
    args.shard = shard_of(args.shard) if args.shard else None
    for name, limit in (("slots", MAX_SLOTS), ("workers", MAX_WORKERS), ("queue_size", MAX_QUEUE)):
        if not 1 <= getattr(args, name) <= limit:
            p.error(f"--{name.replace('_', '-')} must be in [1, {limit}], got {getattr(args, name)}")
    args.seg_vae = resolve_vae_path(args.seg_vae)
    return args


def job_record(pg: "PaliGemma", generation: GenerationConfig, mask_decoder: "MaskDecoder | None") -> dict:
    """What makes a job's answers what they are (recorded beside its results file): a resumed job
    must have the same. (`annotate` refuses beam search and the recording options.)"""
    options = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_tokens", "cache_length")
    return {"model": str(pg.path.resolve()) if pg.path is not None else None, "dtype": np.dtype(pg.dtype).name,
            "masks": mask_decoder is not None, **{name: getattr(generation, name) for name in options}}


def annotate_to_file(pg: "PaliGemma", items: Iterable[Item | ImageInput], out: str | os.PathLike,
                     prompt: str | None = None, *, progress: bool = True,
                     warn: Callable[[str], None] = warn_default, inputs: Iterable[str | os.PathLike] = (),
                     **job: Any) -> JobStats:
    """`annotate` into a results file (see `results_file`): what is in `out` already is skipped,
    each answer is appended as it ends, and the file is put in input order once nothing is left
    out. `job`: `annotate`'s keywords; `inputs`: files the job reads (refused as `out`). Every
    check runs before `out` is created. Returns what the job did."""
    from tqdm import tqdm

    items = _item_list(items, prompt)
    options = {k: v for k, v in job.items() if k not in _JOB_KEYWORDS}
    generation = GenerationConfig.resolve(job.get("generation_config"), options)
    record = job_record(pg, generation, job.get("mask_decoder") or pg.mask_decoder)
    if job.get("shard") is not None:
        record["shard"] = list(job["shard"])
    if not job.get("timings", True):
        record["timings"] = False
    share = shard_share(len(items), job.get("shard") or (0, 1))
    stats = JobStats()
    with ResultsFile(out, record, inputs=inputs, warn=warn) as results:
        records = annotate(pg, items, ordered=False, done=results.done, stats=stats, warn=warn, **job)
        with tqdm(total=len(share) - stats.already_done, unit="img", file=sys.stderr, disable=not progress,
                  smoothing=0.05) as bar:
            for answer in records:
                results.write(answer)
                bar.update()
        if not stats.skipped:
            results.finish((items[i].name, items[i].prompt) for i in share)
    return stats


# `annotate`'s keywords that are not generation options
_JOB_KEYWORDS = frozenset(p.name for p in inspect.signature(annotate).parameters.values() if p.kind == p.KEYWORD_ONLY)


def run(args: argparse.Namespace) -> JobStats:
    """The job of the command line; returns what it did."""
    import jax

    from pali_jax.cli import generation_config, warn
    from pali_jax.generate import enable_compilation_cache
    from pali_jax.pretrained import PaliGemma
    from pali_jax.sharding import mesh_from_args

    generation = generation_config(args)
    if generation.beams > 1:
        raise GenerationError("beams", "--beams: annotate decodes greedily or by sampling (continuous batching); "
                              "beam search runs in fixed batches: use pali-jax generate --beams")
    items = [_as_item(item, i, args.prompt) for i, item in enumerate(read_items(
        args.images, allow_outside=args.allow_outside_paths))]
    inputs = [args.images] if Path(args.images).is_file() else []
    if args.merge is not None:
        lines = merge_shards(args.out, args.merge, [(item.name, item.prompt) for item in items], inputs=inputs)
        print(f"merged {len(args.merge)} shards: {lines} results in {args.out}", flush=True)
        return JobStats(already_done=lines)
    ResultsFile(args.out, None, inputs=inputs).close()  # a bad --out fails now, before the model loads
    mesh = mesh_from_args(args)
    if jax.process_count() > 1:
        raise UserError("annotate runs in one process (--mesh spreads its slots over this host's devices)")
    if not args.no_compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    pg = PaliGemma.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, mask_decoder=args.seg_vae,
                                   quantize=args.quantize, group_size=args.group_size)
    stats = annotate_to_file(pg, items, args.out, progress=not args.no_progress, warn=warn, inputs=inputs,
                             generation_config=generation, slots=args.slots, workers=args.workers,
                             queue_size=args.queue_size, stop_on_error=args.stop_on_error, shard=args.shard,
                             timings=not args.no_timings)
    rate = stats.answered / stats.wall_s if stats.wall_s else 0.0
    print(f"annotated {stats.answered} images in {stats.wall_s:.1f} s ({rate:.1f} images/s); {stats.skipped} "
          f"skipped, {stats.already_done} already in {args.out}", flush=True)
    return stats


def command(argv: list[str], prog: str = "pali-jax annotate") -> None:
    """`pali-jax annotate ARGS` (see the module docstring)."""
    run(parse_args(argv, prog))
