"""The metrics equal the reference scorers on fixed fixtures (pycocoevalcap, the official VQA
evaluation, pycocotools' COCOeval, big_vision's box and mask rules); the command scores, refuses
bad input in one line, and writes nothing then; the demo model's boxes are scored as generate does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pali_jax import cli, evaluate, metrics
from pali_jax.detection import parse_detections
from pali_jax.results_file import box_record
from pali_jax.segmentation import rle_encode

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "pali_jax" / "assets" / "demo" / "model"


# -- captions ------------------------------------------------------------------------------------
def caption_fixture(n: int = 300, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Tokenised captions from a small vocabulary (many shared n-grams), with varied lengths and
    reference counts, repeats, one-word and empty captions."""
    rng = random.Random(seed)
    words = "a the man dog red ball on grass sits with two runs blue small big near".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))

    cands, refs = [], []
    for i in range(n):
        group = [sentence() for _ in range(rng.randint(1, 6))]
        cand = rng.choice([sentence(), group[0], " ".join(group[0].split()[:3]), group[-1] + " a"])
        cands.append("" if i == 7 else cand)
        refs.append(group)
    return cands, refs


def test_caption_scores_equal_pycocoevalcap():
    cands, refs = caption_fixture()
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    cider, per_caption = metrics.cider_d(cands, refs)
    expected_cider, expected_per = Cider().compute_score(gts, res)
    assert abs(cider - expected_cider) <= 1e-6
    np.testing.assert_allclose(per_caption, expected_per, rtol=0, atol=1e-6)
    assert abs(metrics.bleu4(cands, refs) - Bleu(4).compute_score(gts, res, verbose=0)[0][3]) <= 1e-6
    assert abs(metrics.rouge_l(cands, refs) - Rouge().compute_score(gts, res)[0]) <= 1e-6


def test_caption_scores_of_identical_and_disjoint_captions():
    refs = [["a red circle"], ["a blue square and a red circle"], ["two green triangles"]]
    same = metrics.caption_metrics([r[0] for r in refs], refs, "simple")
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0) and same["count"] == 3
    other = metrics.caption_metrics(["zebra", "zebra", "zebra"], refs, "simple")
    assert other["cider"] == 0.0 and other["rouge_l"] == 0.0 and other["bleu4"] < 1e-6


def test_lcs_equals_dynamic_programming():
    rng = random.Random(1)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 15))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 15))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
        assert metrics.lcs_length(a, b) == table[-1][-1], (a, b)


# What pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, Java) writes for each caption.
PTB_TOKENS = {
    "A man's hat.": "a man 's hat",
    "Two dogs (brown) play, don't they?": "two dogs -lrb- brown -rrb- play do n't they",
    "a  red circle and a blue square": "a red circle and a blue square",
    'the "best" cat -- ever...': "the best cat ever",
    "It's 3.5 m-long; ok!": "it 's 3.5 m-long ok",
    "'quoted' words": "quoted words",
    "people's cars aren't there.": "people 's cars are n't there",
    "A man on a bike, riding down the street.": "a man on a bike riding down the street",
}


@pytest.mark.parametrize("text", sorted(PTB_TOKENS))
def test_simple_tokenizer_writes_what_ptb_writes(text):
    assert metrics.simple_tokenize(text) == PTB_TOKENS[text]


@pytest.mark.skipif(not metrics.java_available(), reason="the PTB tokenizer runs on Java, not installed here")
def test_ptb_tokenizer_equals_pycocoevalcaps_wrapper():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [*PTB_TOKENS, "", "two\nlines", "Mr. Smith's café"]
    theirs = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert metrics.tokenize_captions(texts, "ptb") == [theirs[i][0] for i in range(len(texts))]


# -- VQA -----------------------------------------------------------------------------------------
def _humans(*given: str) -> list[str]:
    return [*given, *["other"] * (10 - len(given))]


# (answer, ten human answers, accuracy from GT-Vision-Lab/VQA's vqaEval.py run on them)
VQA_CASES = [
    ("yes", ["yes"] * 10, 1.0), ("Yes", ["yes"] * 10, 0.0), ("Yes", _humans("yes", "yes", "yes"), 0.9),
    ("yes.", _humans("yes", "yes"), 0.6), (" yes\n", _humans("yes", "yes", "yes", "yes"), 1.0),
    ("yes\tplease", _humans("yes please"), 0.3), ("no", _humans(*["no"] * 9), 1.0),
    ("two", _humans("2", "2", "2"), 0.9), ("Two", ["two"] * 10, 0.0), ("2", _humans("two", "two"), 0.6),
    ("ten", _humans("10", "10", "10", "10"), 1.0), ("none", _humans("0", "0"), 0.6),
    ("zero", _humans("none", "none", "none"), 0.9), ("eleven", _humans("11", "11", "11"), 0.0),
    ("a dog", _humans("dog", "dog", "dog"), 0.9), ("the dog", _humans("a dog", "dog"), 0.6),
    ("an apple", _humans("apple", "the apple", "apple"), 0.9), ("The Man", _humans("man", "man", "man"), 0.9),
    ("dont", _humans("don't", "don't", "don't"), 0.9), ("don't", _humans("dont", "dont"), 0.6),
    ("isnt", _humans("isn't", "isn't", "isn't"), 0.9), ("whats", _humans("what's", "what's"), 0.6),
    ("Im", _humans("i'm", "i'm", "i'm"), 0.0), ("1,000", _humans("1000", "1000", "1000"), 0.9),
    ("1,000", _humans("1,000", "1,000", "1,000"), 0.9), ("1, 2", _humans("1 2", "1 2", "1 2"), 0.9),
    ("2.5", _humans("2.5", "2.5", "2.5"), 0.9), ("2.5", _humans("25", "25", "25"), 0.0),
    ("st.", _humans("st", "st", "st"), 0.9), ("end.", _humans("end", "end", "end", "end"), 1.0),
    ("black/white", _humans("black white", "black white", "black white"), 0.9),
    ("black / white", _humans("black white", "blackwhite", "black  white"), 0.6),
    ("t-shirt", _humans("t shirt", "t shirt", "t shirt"), 0.9),
    ("t - shirt", _humans("t  shirt", "tshirt", "t shirt"), 0.6), ("(left)", _humans("left", "left", "left"), 0.9),
    ('"stop"', _humans("stop", "stop", "stop"), 0.9), ("what?", _humans("what", "what", "what"), 0.9),
    ("hi!", _humans("hi", "hi", "hi"), 0.9), ("a+b", _humans("a b", "a b", "a b"), 0.9),
    ("x=y", _humans("x y", "x y"), 0.6), ("email@home", _humans("email home", "email home", "email home"), 0.9),
    ("under_score", _humans("under score", "under score", "under score"), 0.9),
    ("back\\slash", _humans("back slash", "back slash", "back slash"), 0.9),
    ("a;b", _humans("a b", "a b", "a b"), 0.9), ("man's hat", _humans("man's hat", "man's hat", "man's hat"), 0.9),
    ("mans hat", _humans("man's hat", "man's hat", "man's hat"), 0.0),
    ("ow's'at", _humans("'ow's'at", "'ow's'at", "'ow's'at"), 0.9), ("", _humans("", "", ""), 0.9),
    ("", ["nothing"] * 10, 0.0), ("café", _humans("café", "café", "cafe"), 0.6),
    ("red", ["red"] * 10, 1.0), ("red", _humans("red"), 0.3), ("red", _humans("red", "red"), 0.6),
    ("red", _humans("red", "red", "red"), 0.9), ("blue", _humans("red", "red", "red"), 0.0),
    ("left side", _humans("left side", "left  side", "Left Side", "left-side"), 1.0),
    ("2 people", _humans("two people", "2 people", "two  people"), 0.9),
    ("." * 40 + "x", _humans("x", "x", "x"), 0.0),  # the official call removes 32 full stops at most
    ("a.b.c", _humans("abc", "abc", "abc"), 0.9), ("3.", _humans("3", "3", "3"), 0.9),
    ("<b>", _humans("b", "b", "b"), 0.9), ("{x}", _humans("x", "x", "x"), 0.9), ("[x]", _humans("x", "x", "x"), 0.9),
    ("`x`", _humans("x", "x", "x"), 0.9), ("a,b", _humans("a b", "ab", "ab"), 0.3),
    ("5,5", _humans("55", "55", "55"), 0.9),
]


@pytest.mark.parametrize("answer, humans, expected", VQA_CASES)
def test_vqa_accuracy_equals_the_official_evaluation(answer, humans, expected):
    assert abs(metrics.vqa_accuracy(answer, humans) - expected) <= 1e-6


def test_vqa_cases_are_many_and_varied():
    assert len(VQA_CASES) >= 50 and len({e for _, _, e in VQA_CASES}) >= 5


def test_vqa_single_reference_is_an_exact_match():
    assert metrics.vqa_accuracy(" red ", ["red"]) == 1.0
    assert metrics.vqa_accuracy("Red", ["red"]) == 0.0


def test_anls():
    assert metrics.anls("Hello", ["hello"]) == 1.0
    assert metrics.anls("helo", ["hello"]) == pytest.approx(0.8)
    assert metrics.anls("xyz", ["hello"]) == 0.0
    assert metrics.anls("abcd", ["abxy", "abcx"]) == pytest.approx(0.75)  # the best reference
    assert metrics.levenshtein("kitten", "sitting") == 3


# -- boxes and masks -----------------------------------------------------------------------------
def _loc(box: tuple[int, int, int, int]) -> str:
    return "".join(f"<loc{v:04d}>" for v in box)


def test_refcoco_accuracy_equals_big_visions_rule():
    rng = np.random.default_rng(0)
    size = (640, 480)  # width, height
    references, predictions, expected = [], [], []
    for i in range(60):
        y0, x0 = rng.integers(0, 700, 2)
        y1, x1 = y0 + rng.integers(1, 320), x0 + rng.integers(1, 320)
        locs = (int(y0), int(x0), int(min(y1, 1023)), int(min(x1, 1023)))
        # the answer's box moved by up to a third of its size (i % 10 == 0: not moved, a sure hit)
        exact = (locs[1] / 1024 * size[0], locs[0] / 1024 * size[1], locs[3] / 1024 * size[0], locs[2] / 1024 * size[1])
        shift = 0.0 if i % 10 == 0 else rng.uniform(0, 0.35)
        dx, dy = shift * (exact[2] - exact[0]), shift * (exact[3] - exact[1])
        ref = (exact[0] + dx, exact[1] - dy, exact[2] + dx, exact[3] - dy)
        text = "no box here" if i % 13 == 0 else f"{_loc(locs)} cat ; {_loc((0, 0, 10, 10))} dog"
        references.append(evaluate.Reference(f"{i}.png", "detect cat", boxes=((ref, "cat"),)))
        predictions.append({"text": text, "boxes": [box_record(b) for b in parse_detections(text, *size)]})
        # big_vision: the first box, bins / 1024 of the image; no box: a miss (IoU 0)
        if i % 13 == 0:
            expected.append(0.0)
            continue
        px = (locs[1] / 1024 * size[0], locs[0] / 1024 * size[1], locs[3] / 1024 * size[0], locs[2] / 1024 * size[1])
        iw = max(0.0, min(px[2], ref[2]) - max(px[0], ref[0]))
        ih = max(0.0, min(px[3], ref[3]) - max(px[1], ref[1]))
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        expected.append(iw * ih / (area(px) + area(ref) - iw * ih))
    got = evaluate.score("refcoco", references, predictions)
    assert got["count"] == 60 and got["invalid"] == 5
    for t in (0.5, 0.75):
        assert abs(got[f"acc@{t}"] - np.mean([e >= t for e in expected])) <= 1e-6
    assert 0 < got["acc@0.75"] < got["acc@0.5"] < 1


def test_detection_map_equals_cocoeval(tmp_path):
    rng = np.random.default_rng(1)
    labels = ["cat", "dog", "car"]
    refs, preds = [], []
    images, annotations, results = [], [], []
    for image_id in range(1, 31):
        image_refs, image_preds = [], []
        for _ in range(int(rng.integers(0, 4))):
            x, y, w, h = (float(v) for v in rng.uniform(0, 200, 4) + [0, 0, 20, 20])
            label = labels[int(rng.integers(3))]
            image_refs.append(((x, y, x + w, y + h), label))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "category_id": labels.index(label) + 1, "area": w * h, "iscrowd": 0})
            if rng.uniform() < 0.8:  # found, jittered
                jx, jy = rng.normal(0, 6, 2)
                score = float(rng.uniform(0.3, 1))
                image_preds.append(((x + jx, y + jy, x + jx + w, y + jy + h), label, score))
                results.append({"image_id": image_id, "category_id": labels.index(label) + 1,
                                "bbox": [x + jx, y + jy, w, h], "score": score})
        if rng.uniform() < 0.5:  # a false positive
            x, y = (float(v) for v in rng.uniform(0, 200, 2))
            label, score = labels[int(rng.integers(3))], float(rng.uniform(0, 0.6))
            image_preds.append(((x, y, x + 30, y + 30), label, score))
            results.append({"image_id": image_id, "category_id": labels.index(label) + 1,
                            "bbox": [x, y, 30.0, 30.0], "score": score})
        images.append({"id": image_id, "width": 400, "height": 400})
        refs.append(image_refs)
        preds.append(image_preds)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": i + 1, "name": n} for i, n in enumerate(labels)]}))
    gt = COCO(str(gt_file))
    coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    got = metrics.detection_map(refs, preds)
    assert abs(got["map"] - coco_eval.stats[0]) <= 1e-6 and abs(got["map50"] - coco_eval.stats[1]) <= 1e-6
    assert 0.1 < got["map"] < got["map50"] < 1


def test_mask_iou_equals_the_direct_computation(tmp_path):
    rng = np.random.default_rng(2)
    references, predictions, inter, union, ious = [], [], [], [], []
    for i in range(12):
        ref = np.zeros((40, 50), bool)
        y, x = rng.integers(0, 30, 2)
        ref[y:y + 10, x:x + 15] = True
        PIL.Image.fromarray(ref.astype(np.uint8) * 255).save(tmp_path / f"m{i}.png")
        references.append(evaluate.Reference(f"{i}.png", "segment cat", mask=str(tmp_path / f"m{i}.png")))
        if i == 3:  # no mask in the answer
            predictions.append({"text": "nothing", "boxes": []})
            pred = np.zeros_like(ref)
        else:
            pred = np.roll(ref, int(rng.integers(-6, 7)), axis=int(rng.integers(2)))
            predictions.append({"text": "", "boxes": [{"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1, "label": "cat",
                                                       "mask": rle_encode(pred)}]})
        # big_vision: intersection / (reference area + predicted area - intersection)
        i_area = int((pred & ref).sum())
        inter.append(i_area)
        union.append(int(ref.sum() + pred.sum() - i_area))
        ious.append(i_area / union[-1])
    got = evaluate.score("segmentation", references, predictions)
    assert abs(got["miou"] - np.mean(ious)) <= 1e-6
    assert abs(got["ciou"] - sum(inter) / sum(union)) <= 1e-6
    assert got["invalid"] == 1 and got["count"] == 12


def test_box_scores_group_each_boxs_tokens():
    loc = lambda t: t >= 100  # noqa: E731
    tokens = [100, 101, 102, 103, 5, 6, 104, 105, 106, 107, 8]
    logp = np.log([0.9, 0.8, 1, 1, 0.5, 1, 1, 1, 0.25, 1, 0.5])
    np.testing.assert_allclose(evaluate.box_scores(tokens, logp, loc), [0.9 * 0.8 * 0.5, 0.25 * 0.5])
    assert evaluate.box_scores([100, 101, 5], np.zeros(3), loc) == []  # three locations are no box


# -- the command ---------------------------------------------------------------------------------
@pytest.fixture
def data(tmp_path) -> Path:
    lines = [
        {"image": "a.png", "prefix": "answer en what color?", "suffix": "red", "answers": ["red", "red", "dark red"]},
        {"image": "b.png", "prefix": "answer en what color?", "answers": ["blue"], "answer_type": "other"},
    ]
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


def _predictions(path: Path, answers: dict[str, str], folder: Path) -> Path:
    path.write_text("".join(json.dumps({"image": str(folder / image), "prompt": "answer en what color?", "text": text,
                                        "boxes": []}) + "\n" for image, text in answers.items()))
    return path


def test_command_scores_a_predictions_file(data):
    preds = _predictions(data / "p.jsonl", {"a.png": "red", "b.png": "green"}, data)
    code = cli.main(["evaluate", "--predictions", str(preds), "--data", str(data / "val.jsonl"), "--task", "vqa",
                          "--out", str(data / "m.json")])
    assert code == 0
    result = json.loads((data / "m.json").read_text())
    assert result["accuracy"] == pytest.approx(metrics.vqa_accuracy("red", ["red", "red", "dark red"]) / 2)
    assert result["exact_match"] == 0.5 and result["count"] == 2


def _fails(capsys, argv: list[str], out: Path, words: str) -> None:
    assert cli.main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_input_is_one_line_and_writes_nothing(data, capsys, tmp_path):
    out = data / "m.json"
    val = str(data / "val.jsonl")
    preds = _predictions(data / "p.jsonl", {"a.png": "red", "b.png": "blue"}, data)
    (data / "empty.jsonl").write_text(json.dumps({"image": "a.png", "prefix": "answer en what color?"}) + "\n")
    _fails(capsys, ["--predictions", str(preds), "--data", str(data / "empty.jsonl"), "--task", "vqa",
                    "--out", str(out)], out, "no reference")
    other = _predictions(data / "other.jsonl", {"x.png": "red", "y.png": "blue"}, data)
    _fails(capsys, ["--predictions", str(other), "--data", val, "--task", "vqa", "--out", str(out)], out,
           "answers none of the references")
    partial = _predictions(data / "partial.jsonl", {"a.png": "red"}, data)
    _fails(capsys, ["--predictions", str(partial), "--data", val, "--task", "vqa", "--out", str(out)], out,
           "no answer for 1 of 2")
    _fails(capsys, ["--predictions", str(preds), "--data", val, "--task", "caption", "--out", str(out)], out,
           "another task")
    _fails(capsys, ["--predictions", str(preds), "--data", val, "--task", "ocr", "--out", str(out)], out,
           "invalid choice")
    _fails(capsys, ["--predictions", str(preds), "--data", val, "--task", "vqa", "--model", "m", "--out", str(out)],
           out, "not allowed with")


def test_model_run_refuses_a_predictions_file_of_other_data_before_loading(data, capsys):
    out = data / "m.json"
    _predictions(evaluate.predictions_path(out), {"x.png": "red"}, data)
    assert cli.main(["evaluate", "--model", "no/such/model", "--data", str(data / "val.jsonl"), "--task", "vqa",
                          "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "answers to other data" in err and err.count("\n") == 1 and not out.exists()


def test_coco_caption_file_is_read(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "one cat"},
                        {"image_id": 2, "caption": "a dog"}]}))
    refs = evaluate.read_references(tmp_path / "captions.json", "caption")
    assert [(Path(r.image).name, r.prompt, r.texts) for r in refs] == [
        ("a.jpg", "caption en", ("a cat", "one cat")), ("b.jpg", "caption en", ("a dog",))]


# -- the model -----------------------------------------------------------------------------------
def test_teacher_forced_box_scores_equal_generate_scores(tmp_path):
    from pali_jax.demo import shapes
    from pali_jax.pretrained import PaliGemma

    pg = PaliGemma.from_pretrained(DEMO_MODEL)
    images = [shapes.render(s) for s in shapes.scenes(3, 11)]
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(tmp_path / f"{i}.png")
    prompts = [f"detect {shapes.scenes(3, 11)[i].shapes[0].kind}" for i in range(3)]
    results = pg.generate([str(tmp_path / f"{i}.png") for i in range(3)], prompts, max_new_tokens=12,
                          output_scores=True)
    records = [{"image": str(tmp_path / f"{i}.png"), "prompt": p, "text": r.text, "token_ids": r.token_ids,
                "stop_reason": r.stop_reason, "boxes": [box_record(b) for b in r.boxes]}
               for i, (p, r) in enumerate(zip(prompts, results))]
    scored = evaluate.add_box_scores(pg, records)
    for record, result in zip(scored, results):
        assert len(record["boxes"]) == 1
        n = len(result.token_ids) - (result.stop_reason == "stop_token")
        assert record["boxes"][0]["score"] == pytest.approx(float(np.exp(np.sum(result.logprobs[:n]))), rel=1e-5)


def test_finetune_reports_what_the_command_reports(tmp_path):
    from pali_jax import finetune
    from pali_jax.demo.dataset import write_dataset

    data = write_dataset(tmp_path / "data", 3, seed=11)["vqa"]
    assert cli.main(["evaluate", "--model", str(DEMO_MODEL), "--data", str(data), "--task", "vqa", "--out",
                          str(tmp_path / "m.json"), "--no-progress", "--slots", "4"]) == 0
    command = json.loads((tmp_path / "m.json").read_text())
    assert (tmp_path / "m.predictions.jsonl").exists()
    args = finetune.parse_args(["--model", str(DEMO_MODEL), "--train", str(data), "--eval", str(data), "--eval-task",
                                "vqa", "--out", str(tmp_path / "run"), "--steps", "1", "--lr", "1e-12",
                                "--batch-size", "4", "--no-progress"])
    result = finetune.run(args)
    lines = [json.loads(x) for x in (tmp_path / "run" / finetune.EVAL_METRICS).read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1]
    for key in ("accuracy", "exact_match", "count"):
        assert lines[0][key] == command[key], key
    assert f"vqa: accuracy {command['accuracy']:.4f}" in result.evaluations[0]
