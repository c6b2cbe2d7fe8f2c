"""Time to score captions (`pali_jax.metrics.caption_metrics`: CIDEr-D, BLEU-4, ROUGE-L) on CPU.

    python -m benchmarks.caption_metrics [--captions 5000] [--references 5] [--tokenizer simple] [--compare]

Synthetic captions of 8 to 14 words from a Zipf-distributed vocabulary of 3,000 words (COCO-like
sharing of n-grams), each with --references others. Times the whole scoring, tokenisation
included (--tokenizer ptb: pycocoevalcap's Java PTB tokenizer), nothing generated; wall-clock and
this process's CPU seconds (the two differ on a shared machine). --compare also
times pycocoevalcap's Cider, Bleu(4) and Rouge on the same tokens and checks the figures agree.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks import report
from pali_jax import metrics


def synthetic(captions: int, references: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(3000)])
    p = 1.0 / np.arange(1, 3001)
    p /= p.sum()

    def sentence() -> str:
        return " ".join(vocab[rng.choice(3000, int(rng.integers(8, 15)), p=p)])

    return [sentence() for _ in range(captions)], [[sentence() for _ in range(references)] for _ in range(captions)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--references", type=int, default=5)
    p.add_argument("--tokenizer", default="simple", choices=("simple", "ptb"))
    p.add_argument("--compare", action="store_true", help="also time pycocoevalcap on the same tokens")
    report.add_arguments(p)
    args = p.parse_args()
    cands, refs = synthetic(args.captions, args.references)
    t0, cpu0 = time.perf_counter(), time.process_time()
    ours = metrics.caption_metrics(cands, refs, args.tokenizer)
    figures = {"captions": args.captions, "references_each": args.references, "tokenizer": args.tokenizer,
              "scoring_s": round(time.perf_counter() - t0, 3), "scoring_cpu_s": round(time.process_time() - cpu0, 3),
              **{k: ours[k] for k in ("cider", "bleu4", "rouge_l")}}
    if args.compare:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts = {i: r for i, r in enumerate(refs)}
        res = {i: [c] for i, c in enumerate(cands)}
        t0, cpu0 = time.perf_counter(), time.process_time()
        theirs = {"cider": Cider().compute_score(gts, res)[0],
                  "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3], "rouge_l": Rouge().compute_score(gts, res)[0]}
        figures["pycocoevalcap_s"] = round(time.perf_counter() - t0, 3)
        figures["pycocoevalcap_cpu_s"] = round(time.process_time() - cpu0, 3)
        figures["max_abs_difference"] = max(abs(float(theirs[k]) - ours[k]) for k in theirs)
    print(json.dumps(figures, indent=1))
    report.write(args, "caption_metrics", ["figure", "value"], [[k, v] for k, v in figures.items()],
                 note=f"{args.captions} synthetic captions x {args.references} references, scored end to end.")


if __name__ == "__main__":
    main()
