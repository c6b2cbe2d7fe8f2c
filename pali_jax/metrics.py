"""The published metrics of PaliGemma's transfer tasks, as pure functions of answers and references.

Captions: CIDEr-D, BLEU-4 and ROUGE-L computed as the COCO caption scorers (`pycocoevalcap`'s Cider,
Bleu(4) and Rouge) compute them from the same tokenised strings: CIDEr-D with document frequencies
over the references, sigma 6, clipped counts and the x10 scale (and pycocoevalcap's length term,
which counts bigrams); corpus BLEU-4 with the closest reference length; ROUGE-L with beta 1.2 and
the best precision and recall over the references. They are written here for speed (bit-parallel
LCS, one pass over the n-grams; see benchmarks/caption_metrics.py) and checked against pycocoevalcap
in tests/test_evaluate.py. Tokenisation: big_vision tokenises both sides with pycocoevalcap's
Stanford PTB tokenizer (Java); `tokenize_captions` runs it when Java is there ("ptb") and has a
Python tokenizer ("simple": lower case, PTB's splits of punctuation and clitics, the PTB
tokenizer's punctuation tokens dropped) for machines without it. The metrics file names which ran.

VQA: the official VQAv2 evaluation (GT-Vision-Lab/VQA vqaEval.py, as big_vision's vqav2 evaluator):
when the humans' answers disagree, punctuation, number words, articles and contractions of every
answer are normalised; min(matching humans / 3, 1) averaged over the leave-one-out subsets. DocVQA: ANLS
(threshold 0.5, best over the answers, lower-cased and trimmed as the DocVQA evaluation does).

Grounding: big_vision's rule: the answer's first box (bins / 1024 of the image), IoU with the
reference box; an answer without a box counts as a miss. Detection: COCO mAP through pycocotools'
COCOeval. Segmentation: mean IoU of the instances (big_vision's "miou") and cumulative IoU (total
intersection over total union, RefCOCO's "cIoU"); a missing mask counts IoU 0.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from pali_jax.errors import UserError

CAPTION_TOKENIZERS = ("auto", "ptb", "simple")


# -- caption tokenisation -------------------------------------------------------------------------
# The tokens pycocoevalcap's PTBTokenizer wrapper drops after tokenising.
_PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                              "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}  # PTB's names
_MARKS = re.compile(r"(\.\.\.|--|[,;:!?\"]|\.$)")  # split off; a full stop only at a token's end
_CLITIC = re.compile(r"(\w)('s|'m|'d|'ll|'re|'ve|n't)$")
_PLAIN = re.compile(r"[a-z0-9 ]*")
_CLITICS = frozenset(("'s", "'m", "'d", "'ll", "'re", "'ve", "n't"))


def java_available() -> bool:
    """Whether pycocoevalcap's PTB tokenizer can run here (Java and the package)."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


def resolve_caption_tokenizer(name: str) -> str:
    """"ptb" or "simple" for a --caption-tokenizer value ("auto": ptb when Java is there)."""
    if name not in CAPTION_TOKENIZERS:
        raise UserError(f"unknown caption tokenizer {name!r}: use {', '.join(CAPTION_TOKENIZERS)}")
    if name == "auto":
        return "ptb" if java_available() else "simple"
    if name == "ptb" and not java_available():
        raise UserError("--caption-tokenizer ptb needs Java and pycocoevalcap (pip install pali-jax[eval]); "
                        "or use --caption-tokenizer simple")
    return name


def simple_tokenize(text: str) -> str:
    """A caption as the PTB tokenizer splits it, lower case, its punctuation tokens dropped, in Python
    ("A man's hat." -> "a man 's hat"); quotes and brackets as PTB writes them."""
    text = text.lower()
    if _PLAIN.fullmatch(text):  # nothing for the tokenizer to split
        return " ".join(text.split())
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    tokens = []
    for word in text.split():
        for part in _MARKS.sub(r" \1 ", word).split():
            quotes_before = len(part) - len(part.lstrip("'`"))
            core = part.lstrip("'`")
            stripped = core.rstrip("'`") if core not in _CLITICS else core
            tokens += ["'"] * quotes_before
            tokens += _CLITIC.sub(r"\1 \2", stripped).split() if stripped else []
            tokens += ["'"] * (len(core) - len(stripped))
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION and t != '"')


def tokenize_captions(texts: Sequence[str], tokenizer: str) -> list[str]:
    """Each text as space-joined tokens: "ptb" (pycocoevalcap's Stanford PTB tokenizer, as big_vision)
    or "simple" (`simple_tokenize`)."""
    if tokenizer == "simple":
        done: dict[str, str] = {}
        return [done[t] if t in done else done.setdefault(t, simple_tokenize(t)) for t in texts]
    return _ptb_tokenize(texts)


def _ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer run as its wrapper runs it (one line per caption, -preserveLines
    -lowerCase, its punctuation tokens dropped), with the input file in a temporary folder rather
    than the package's (which may be read-only) and the tokenizer's progress line kept off stderr."""
    import os
    import subprocess
    import tempfile

    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "captions.txt")
        with open(source, "w", encoding="utf-8") as f:
            f.write("\n".join(t.replace("\n", " ") for t in texts))
        done = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", source], capture_output=True, check=False)
    if done.returncode != 0:
        raise UserError(f"the PTB tokenizer (Java) failed: {done.stderr.decode(errors='replace').strip()[-300:]} "
                        "(--caption-tokenizer simple needs no Java)")
    lines = done.stdout.decode("utf-8").split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATION) for line in lines[:len(texts)]]


# -- caption scores -------------------------------------------------------------------------------
Grams = tuple[Counter, Counter, Counter, Counter]  # counts of the 1-, 2-, 3- and 4-grams


def _ngrams(words: Sequence[str]) -> Grams:
    """Counts of the 1..4-grams of `words`, each n-gram a space-joined string (tokens hold no
    space; a string caches its hash, which the scorers' many lookups reuse)."""
    return (Counter(words), *(Counter(map(" ".join, zip(*(words[i:] for i in range(k))))) for k in (2, 3, 4)))


def _counted(sentences: Iterable[str], cache: dict[str, Grams] | None) -> dict[str, Grams]:
    """The n-gram counts of each distinct sentence (added to `cache` when given)."""
    cache = {} if cache is None else cache
    for s in sentences:
        if s not in cache:
            cache[s] = _ngrams(s.split())
    return cache


def _check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise UserError(f"{len(candidates)} answers for {len(references)} reference sets")
    if not candidates:
        raise UserError("nothing to score")
    if any(not refs for refs in references):
        raise UserError("an answer has no reference")


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0, *,
            counts: dict[str, Grams] | None = None) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised captions (space-joined tokens): (corpus mean, one score per caption),
    as pycocoevalcap's Cider. `counts`: n-gram counts already made (see `caption_metrics`)."""
    _check_pairs(candidates, references)
    counts = _counted([*candidates, *(r for refs in references for r in refs)], counts)
    df: Counter = Counter()
    for refs in references:
        for k in range(4):
            df.update(set().union(*(counts[r][k] for r in refs)))
    log_images = math.log(float(len(references)))
    idf = {gram: log_images - math.log(max(1.0, n)) for gram, n in df.items()}
    vectors: dict[str, tuple[list[dict], list[float], int]] = {}

    def vector(sentence: str) -> tuple[list[dict], list[float], int]:
        """tf-idf weights and their norm per n; the length term (pycocoevalcap counts bigrams there)."""
        if sentence not in vectors:
            grams = counts[sentence]
            vec = [{g: tf * idf.get(g, log_images) for g, tf in grams[k].items()} for k in range(4)]
            vectors[sentence] = (vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec], sum(grams[1].values()))
        return vectors[sentence]

    scores = []
    denominator = 2 * sigma ** 2
    for cand, refs in zip(candidates, references):
        vec, norm, length = vector(cand)
        total = [0.0] * 4
        for ref in refs:
            rvec, rnorm, rlength = vector(ref)
            penalty = math.exp(-((length - rlength) ** 2) / denominator)
            for k in range(4):
                theirs = rvec[k]
                value = 0.0
                for gram, w in vec[k].items():
                    r = theirs.get(gram)
                    if r is not None:
                        value += min(w, r) * r
                if norm[k] != 0 and rnorm[k] != 0:
                    value /= norm[k] * rnorm[k]
                total[k] += value * penalty
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(scores)), scores


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
          counts: dict[str, Grams] | None = None) -> float:
    """Corpus BLEU-4 of tokenised captions with the closest reference length, as pycocoevalcap's Bleu(4)."""
    _check_pairs(candidates, references)
    counts = _counted([*candidates, *(r for refs in references for r in refs)], counts)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * 4, [0] * 4
    test_total = ref_total = 0
    for cand, refs in zip(candidates, references):
        n = len(cand.split())
        test_total += n
        ref_total += min((abs(l - n), l) for l in (len(r.split()) for r in refs))[1]
        for k in range(4):
            best: Counter = Counter()
            for ref in refs:
                best |= counts[ref][k]  # the highest count of each n-gram over the references
            correct[k] += sum(min(best.get(g, 0), c) for g, c in counts[cand][k].items())
            guess[k] += max(0, n - k)
    score = 1.0
    for k in range(4):
        score *= (correct[k] + tiny) / (guess[k] + small)
    score **= 1.0 / 4
    ratio = (test_total + tiny) / (ref_total + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, Hyyrö's recurrence)."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = defaultdict(int)
    for i, token in enumerate(a):
        masks[token] |= 1 << i
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score (best precision and best recall over the references), as pycocoevalcap's Rouge."""
    _check_pairs(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        words = cand.split(" ")  # pycocoevalcap splits on single spaces: "" is one empty token
        precision = recall = 0.0
        for ref in refs:
            ref_words = ref.split(" ")
            lcs = lcs_length(ref_words, words)
            precision = max(precision, lcs / len(words))
            recall = max(recall, lcs / len(ref_words))
        scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
                      if precision and recall else 0.0)
    return float(np.mean(scores))


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]],
                    tokenizer: str = "auto") -> dict[str, float | int | str]:
    """cider, bleu4, rouge_l of raw captions after tokenising both sides; count; caption_tokenizer."""
    _check_pairs(candidates, references)
    tokenizer = resolve_caption_tokenizer(tokenizer)
    flat = tokenize_captions([*candidates, *(r for refs in references for r in refs)], tokenizer)
    cands, rest, refs = flat[:len(candidates)], iter(flat[len(candidates):]), []
    for group in references:
        refs.append([next(rest) for _ in group])
    counts = _counted(flat, None)
    return {"cider": cider_d(cands, refs, counts=counts)[0], "bleu4": bleu4(cands, refs, counts=counts),
            "rouge_l": rouge_l(cands, refs),
            "count": len(candidates), "caption_tokenizer": tokenizer}


# -- VQA ------------------------------------------------------------------------------------------
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, its odd lookahead included
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
# The official contraction table: each missing apostrophe put back ("dont" -> "don't").
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're
whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've
yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've
youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've""".split())


def vqa_punctuation(text: str) -> str:
    """The official evaluation's punctuation step (a mark next to a space, or any mark in a text with
    a digit comma, is deleted; others become a space; full stops not before a digit go)."""
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return _PERIOD.sub("", out, 32)  # the official call passes re.UNICODE (32) as the count


def vqa_digits_articles(text: str) -> str:
    """The official evaluation's word step: lower case, number words to digits, articles dropped,
    contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _vqa_strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one answer: min(#other humans who gave it / 3, 1), averaged over leaving
    each human out. Both sides are normalised only when the humans disagree (the official rule); a
    single reference answer counts as an exact match (leaving it out would leave nothing)."""
    if not human_answers:
        raise UserError("a VQA answer needs at least one human answer")
    answer = _vqa_strip(answer)
    humans = [_vqa_strip(h) for h in human_answers]
    if len(set(humans)) > 1:
        humans = [vqa_digits_articles(vqa_punctuation(h)) for h in humans]
        answer = vqa_digits_articles(vqa_punctuation(answer))
    if len(humans) == 1:
        return float(humans[0] == answer)
    matches = [h == answer for h in humans]
    total = sum(matches)
    return float(np.mean([min(1.0, (total - m) / 3) for m in matches]))


def levenshtein(a: str, b: str) -> int:
    """Character edit distance."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(answer: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity of one answer: the best over the references of
    1 - distance / longer length, 0 at or above `threshold` (texts trimmed and lower-cased)."""
    if not references:
        raise UserError("an ANLS answer needs at least one reference")
    answer = " ".join(answer.split()).lower()
    best = 0.0
    for ref in references:
        ref = " ".join(ref.split()).lower()
        longest = max(len(ref), len(answer))
        distance = levenshtein(ref, answer) / longest if longest else 0.0
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


# -- boxes and masks ------------------------------------------------------------------------------
Box = tuple[float, float, float, float]  # xmin, ymin, xmax, ymax


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (xmin, ymin, xmax, ymax) boxes; 0 when the union is empty."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_metrics(predicted: Sequence[Box | None], references: Sequence[Box],
                      thresholds: Iterable[float] = (0.5, 0.75)) -> dict[str, float | int]:
    """acc@t: the share of answers whose box (None: no box in the answer, a miss) has IoU >= t with
    its reference; mean_iou; invalid (answers without a box); count."""
    if len(predicted) != len(references) or not references:
        raise UserError(f"{len(predicted)} answers for {len(references)} reference boxes")
    ious = [0.0 if p is None else box_iou(p, r) for p, r in zip(predicted, references)]
    out: dict[str, float | int] = {f"acc@{t:g}": float(np.mean([iou >= t for iou in ious])) for t in thresholds}
    return {**out, "mean_iou": float(np.mean(ious)), "invalid": sum(p is None for p in predicted),
            "count": len(references)}


def detection_map(references: Sequence[Sequence[tuple[Box, str]]],
                  predictions: Sequence[Sequence[tuple[Box, str, float]]]) -> dict[str, float | int]:
    """COCO box mAP (IoU 0.5:0.95) and mAP@0.5 through pycocotools' COCOeval: per image, reference
    (box, label) pairs and predicted (box, label, score) triples; labels are the categories."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UserError("detection mAP needs pycocotools: pip install pali-jax[eval]") from None
    if len(references) != len(predictions) or not references:
        raise UserError(f"{len(predictions)} answers for {len(references)} reference images")
    labels = sorted({label for refs in references for _, label in refs})
    if not labels:
        raise UserError("the references hold no box: nothing to detect")
    category = {label: i + 1 for i, label in enumerate(labels)}
    images, annotations, results = [], [], []
    for image_id, (refs, preds) in enumerate(zip(references, predictions), start=1):
        images.append({"id": image_id})
        for (x0, y0, x1, y1), label in refs:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for (x0, y0, x1, y1), label, score in preds:
            if label in category:  # a label no reference has cannot be scored against a category
                results.append({"image_id": image_id, "category_id": category[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": i} for i in category.values()]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        if not results:
            return {"map": 0.0, "map50": 0.0, "count": len(references), "boxes": len(annotations)}
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    # COCOeval reports -1 where no category has a reference box at that area: none here (all areas).
    return {"map": max(0.0, float(coco_eval.stats[0])), "map50": max(0.0, float(coco_eval.stats[1])),
            "count": len(references), "boxes": len(annotations)}


def mask_metrics(predicted: Sequence[np.ndarray | None], references: Sequence[np.ndarray]) -> dict[str, float | int]:
    """miou: mean over instances of the mask IoU (None: no mask in the answer, IoU 0); ciou: total
    intersection over total union; invalid; count. Masks are bool [H, W] of the image."""
    if len(predicted) != len(references) or not references:
        raise UserError(f"{len(predicted)} answers for {len(references)} reference masks")
    ious, inter_total, union_total = [], 0, 0
    for pred, ref in zip(predicted, references):
        ref = np.asarray(ref, bool)
        if pred is None:
            inter, union = 0, int(ref.sum())
        else:
            pred = np.asarray(pred, bool)
            inter, union = int((pred & ref).sum()), int((pred | ref).sum())
        ious.append(inter / union if union else 0.0)
        inter_total, union_total = inter_total + inter, union_total + union
    return {"miou": float(np.mean(ious)), "ciou": inter_total / union_total if union_total else 0.0,
            "invalid": sum(p is None for p in predicted), "count": len(references)}


def mean_by(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Mean of `values` per group name."""
    sums: dict[str, list[float]] = defaultdict(list)
    for v, g in zip(values, groups):
        sums[g].append(v)
    return {g: float(np.mean(v)) for g, v in sorted(sums.items())}
