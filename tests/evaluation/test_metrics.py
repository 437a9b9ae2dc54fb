"""Task metrics against their reference implementations: pycocoevalcap (BLEU, CIDEr-D, its Java PTB
tokenizer where Java is installed) and the official VQA eval script (tests/eval/reference_vqa_eval.py)."""

from __future__ import annotations

import copy
import random
import shutil

import numpy as np
import pytest
import reference_vqa_eval
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from mllm_jax.evaluation import metrics

COLORS = "red green blue white black brown yellow orange".split()
NOUNS = "dog cat man woman boy girl horse bus train pizza bird kite".split()
VERBS = "sitting standing running walking eating flying lying riding".split()
PLACES = "beach street table field grass road kitchen park".split()


def _caption(rng: random.Random, c: str, n: str, v: str, p: str) -> str:
    templates = (
        "a {c} {n} {v} on the {p}",
        "the {n} is {v} near a {p}",
        "{c} {n} {v}",
        "a photo of a {c} {n} in the {p}",
        "there is a {n} {v} by the {p} with a {c} {n}",
        "a {n} and a {n} {v} in a {c} {p}",
    )
    return rng.choice(templates).format(c=c, n=n, v=v, p=p)


def caption_fixture() -> tuple[dict, dict]:
    """36 images x 5 references, hypotheses of every quality, plus hand-written edge cases."""
    rng = random.Random(0)
    refs, hyps = {}, {}
    for i in range(36):
        c, n, v, p = rng.choice(COLORS), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(PLACES)
        # references vary one slot at a time around the image's "truth"
        refs[i] = [
            _caption(rng, rng.choice([c, c, rng.choice(COLORS)]), n, rng.choice([v, rng.choice(VERBS)]), p)
            for _ in range(5)
        ]
        kind = i % 4
        if kind == 0:
            hyps[i] = refs[i][0]
        elif kind == 1:
            hyps[i] = _caption(rng, c, n, v, p)
        elif kind == 2:
            hyps[i] = _caption(rng, rng.choice(COLORS), rng.choice(NOUNS), v, rng.choice(PLACES))
        else:
            hyps[i] = " ".join(rng.sample(refs[i][1].split(), k=len(refs[i][1].split())))
    edge = {
        "empty": ("", ["a dog on the beach"] * 2 + ["a brown dog running", "dog", "the dog is sitting"]),
        "longer": (" ".join(refs[0] + refs[1]), refs[0]),
        "repeated": (
            "dog dog dog dog dog dog dog",
            ["a dog", "a dog on a dog bed", "dog", "two dogs", "the dog"],
        ),
        "one_word": ("cat", ["a cat on a mat", "the cat", "cat sitting", "a black cat", "cat"]),
        "novel": (
            "zebra galloping across savanna",
            ["a red bus", "a bus on the road", "bus", "red bus", "a bus"],
        ),
        "ties": ("a b c", ["a b", "a b c d", "x", "a b c d e f", "c"]),  # closest ref length: a tie
    }
    for key, (hyp, rs) in edge.items():
        refs[key], hyps[key] = list(rs), hyp
    return refs, hyps


def _reference_caption_scores(refs: dict, hyps: dict):
    gts, res = {k: list(v) for k, v in refs.items()}, {k: [hyps[k]] for k in refs}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_image = Cider().compute_score(gts, res)
    return bleu, np.array(bleu_per_image), cider, np.array(cider_per_image)


@pytest.mark.parametrize("subset", ["all", "edge_cases", "single_image"])
def test_bleu_and_cider_equal_pycocoevalcap(subset):
    refs, hyps = caption_fixture()
    keys = {
        "all": list(refs),
        "edge_cases": [k for k in refs if isinstance(k, str)],
        "single_image": [3],  # one image: every idf is 0, so CIDEr is 0
    }[subset]
    refs, hyps = {k: refs[k] for k in keys}, {k: hyps[k] for k in keys}
    ref_bleu, ref_bleu_img, ref_cider, ref_cider_img = _reference_caption_scores(refs, hyps)

    bleu, bleu_img = metrics.bleu(refs, hyps, 4)
    cider, cider_img = metrics.cider_d(refs, hyps)
    np.testing.assert_allclose(bleu, ref_bleu, rtol=0, atol=1e-6)
    np.testing.assert_allclose(bleu_img, ref_bleu_img, rtol=0, atol=1e-6)
    assert abs(cider - ref_cider) <= 1e-6
    np.testing.assert_allclose(cider_img, ref_cider_img, rtol=0, atol=1e-6)
    if subset == "all":  # the fixture spans a real range, so agreement is not trivially 0 == 0
        assert 0.1 < ref_bleu[3] < 0.9 and ref_cider > 0.5 and ref_cider_img.min() == 0.0


def test_caption_scores_are_per_corpus_and_key_order_free():
    refs, hyps = caption_fixture()
    scores = metrics.caption_scores(refs, hyps, tokenize=False)
    reversed_refs = dict(reversed(list(refs.items())))
    assert metrics.caption_scores(reversed_refs, hyps, tokenize=False) == pytest.approx(scores, abs=1e-12)
    # CIDEr's idf comes from the evaluated references: scoring a subset changes an image's score.
    sub = [0, 1, 2, 3]
    sub_scores = metrics.cider_d({k: refs[k] for k in sub}, {k: hyps[k] for k in sub})[1]
    assert not np.allclose(sub_scores, metrics.cider_d(refs, hyps)[1][:4])
    # a perfect caption scores BLEU-4 of 1
    assert metrics.bleu({0: ["a b c d e"]}, {0: "a b c d e"})[0][3] == pytest.approx(1.0, abs=1e-6)


def test_caption_inputs_are_validated():
    with pytest.raises(ValueError, match="same image keys"):
        metrics.cider_d({1: ["a"], 2: ["b"]}, {1: "a"})
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        metrics.bleu({1: []}, {1: "a"})
    with pytest.raises(ValueError, match="must be one string"):
        metrics.bleu({1: ["a"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="at least one image"):
        metrics.cider_d({}, {})


# Each line checked against stanford-corenlp 3.4.1's PTBTokenizer as pycocoevalcap runs it.
PTB_CASES = {
    "A man's dog, running (fast) on the beach.": "a man 's dog running -lrb- fast -rrb- on the beach",
    "They've been there. I'd say": "they 've been there i 'd say",
    "A dog's toys and the dogs' bowls": "a dog 's toys and the dogs bowls",
    "\"quoted\" and 'single quoted' words": "quoted and single quoted words",
    "A [bracketed] {braced} thing": "a -lsb- bracketed -rsb- -lcb- braced -rcb- thing",
    "Is it 5 p.m.?": "is it 5 p.m.",
    "A 3-year-old boy at 5:30pm": "a 3-year-old boy at 5:30 pm",
    "Mr. Smith and Dr. Who, etc. are here": "mr. smith and dr. who etc. are here",
    "cannot gotta wanna gimme lemme": "can not got ta wan na gim me lem me",
    "A    TABLE   with spaces ": "a table with spaces",
    "this is the end... dogs... and cats": "this is the end dogs and cats",
    "A man with an umbrella;on a street:like this": "a man with an umbrella on a street like this",
    "it's ok, isn't it? Yes! can't won't": "it 's ok is n't it yes ca n't wo n't",
    "The U.S. flag. A T.V. on the wall.": "the u.s. flag a t.v. on the wall",
    "A man - on a bike -- rides -fast- a x-ray": "a man on a bike rides fast a x-ray",
    "a 1,000 pound bear at 10:30 with $5 and 100%": "a 1,000 pound bear at 10:30 with $ 5 and 100 %",
    "a cat!! a cat?! rock 'n' roll in the '90s": "a cat !! a cat ?! rock 'n' roll in the '90s",
    "sheep/goats &amp; cows at 10am, 4x4 truck": "sheep/goats & cows at 10am 4x4 truck",
    "A sign that reads 'No Parking'.": "a sign that reads no parking",
}


def test_ptb_tokenize_matches_the_cases():
    assert {k: metrics.ptb_tokenize(k) for k in PTB_CASES} == PTB_CASES


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs Java")
def test_ptb_tokenize_matches_java_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, _ = caption_fixture()
    texts = list(PTB_CASES) + [
        "Two people are sitting at a table with food.",
        "A close up of a pizza on a plate, with cheese!",
        "There's a kitchen with wooden cabinets and a white refrigerator.",
        "A plate of food with broccoli, carrots and rice;  it's (very) tasty...",
        "St. Louis and Mt. Fuji vs. the U.K.",
    ]
    texts += [r.capitalize() + ". " for r in refs[0] + refs[1]]
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [metrics.ptb_tokenize(t) for t in texts] == [java[i][0] for i in range(len(texts))]


# ---------------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------------

ANSWER_STRINGS = [
    "2", "two", "Two.", " 2 ", "2!", "yes", "Yes", "yes.", "a dog", "dog", "The dog", "dogs", "1,000", "1000",
    "dont know", "don't know", "dont", "3.5", "3.5.", "t-shirt", "t shirt", "tshirt", "left/right", "left",
    "hot dog!", "hot-dog", "(maybe)", "maybe", "none", "0", "an apple", "apple", "red, white", "red white",
    "u.s.a.", "usa", "mr. smith's", "10:30", "yes\n", "no\tway", "It's", "its", "the the", "o'clock",
    "oclock",
    "a" + "." * 40 + "b",
]  # fmt: skip


class _QA:
    """The minimal VQA-API object that VQAEval reads (``qa`` and ``getQuesIds``)."""

    def __init__(self, qa: dict):
        self.qa = qa

    def getQuesIds(self):  # noqa: N802 - the official API's name
        return list(self.qa)


def test_answer_normalisation_equals_official():
    ref = reference_vqa_eval.VQAEval(_QA({}), _QA({}))
    rng = random.Random(1)
    texts = ANSWER_STRINGS + [" ".join(rng.sample(ANSWER_STRINGS, 3)) for _ in range(300)]
    texts += [f"the {k}?" for k in list(ref.contractions) + list(ref.manualMap)]  # every table entry
    for text in texts:
        clean = text.replace("\n", " ").replace("\t", " ").strip()
        assert metrics.normalize_answer(text) == ref.processDigitArticle(ref.processPunctuation(clean)), text
    assert metrics.normalize_answer("Two dogs.") == "2 dogs"


def _reference_vqa(questions: list[tuple[str, list[str]]]) -> list[float]:
    gts, res = {}, {}
    for qid, (pred, answers) in enumerate(questions):
        gts[qid] = {
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
            ],
            "question_type": "what",
            "answer_type": "other",
        }
        res[qid] = {"answer": pred}
    evaluator = reference_vqa_eval.VQAEval(_QA(copy.deepcopy(gts)), _QA(res), n=10)  # 10 places: unrounded
    evaluator.evaluate()
    return [evaluator.evalQA[qid] / 100 for qid in range(len(questions))]


def test_vqa_accuracy_equals_official(capsys):
    rng = random.Random(2)
    groups = [ANSWER_STRINGS[i : i + 5] for i in range(0, len(ANSWER_STRINGS), 5)]
    questions = []
    for q in range(400):
        pool = rng.choice(groups)
        if q % 10 == 0:
            answers = [rng.choice(pool)] * 10  # unanimous humans: the official script skips normalisation
        else:
            answers = [rng.choice(pool) for _ in range(10)]
        questions.append((rng.choice(pool + [rng.choice(ANSWER_STRINGS)]), answers))
    expected = _reference_vqa(questions)
    capsys.readouterr()
    ours = [metrics.vqa_accuracy(p, a) for p, a in questions]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9)
    assert len(set(np.round(expected, 6))) >= 5  # the fixture covers partial credit, not just 0 and 1
    assert metrics.mean_vqa_accuracy(*zip(*questions, strict=True)) == pytest.approx(np.mean(expected))


def test_vqa_accuracy_partial_credit_and_quirks():
    # k of 10 humans gave the answer: the 10 leave-one-out subsets give 0, 0.3, 0.6, 0.9, then 1.
    for k, acc in enumerate([0.0, 0.3, 0.6, 0.9, 1.0, 1.0]):
        assert metrics.vqa_accuracy("cat", ["cat"] * k + ["dog"] * (10 - k)) == pytest.approx(acc)
    assert metrics.vqa_accuracy("Two.", ["2"] * 4 + ["3"] * 6) == 1.0  # normalised when humans disagree
    assert metrics.vqa_accuracy("two", ["2"] * 10) == 0.0  # ... and verbatim when they all agree (official)
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.vqa_accuracy("2", "2")


def test_exact_match_normalises_both_sides():
    assert metrics.exact_match("Two dogs.", "2 dogs") == 1.0
    assert metrics.exact_match("the red circle", ["square", "red circle"]) == 1.0
    assert metrics.exact_match("yes", ["no"]) == 0.0
    assert metrics.exact_match("yes", "yes please") == 0.0


# ---------------------------------------------------------------------------------------------------------
# grounding and retrieval
# ---------------------------------------------------------------------------------------------------------


def test_box_iou_and_grounding_accuracy():
    assert metrics.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert metrics.box_iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)
    assert metrics.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert metrics.box_iou([5, 5, 0, 0], [0, 0, 5, 5]) == 0.0  # inverted prediction
    targets = [[0, 0, 10, 10]] * 4
    preds = [[0, 0, 10, 10], None, [0, 0, 5, 10], [0, 0, 4.9, 10]]  # IoU 1, miss, exactly 0.5, 0.49
    assert metrics.grounding_accuracy(preds, targets) == 0.5
    assert metrics.grounding_accuracy(preds, targets, threshold=0.4) == 0.75
    with pytest.raises(ValueError, match="as many predictions as targets"):
        metrics.grounding_accuracy(preds[:2], targets)
    with pytest.raises(ValueError, match=r"\(x0, y0, x1, y1\)"):
        metrics.box_iou([0, 0, 1], [0, 0, 1, 1])


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    # query 0: positive 0 is top; query 1: positive 0 ranks last; query 2: positives {1, 2}, best (1) is 2nd
    r = metrics.recall_at_k(sim, [0, 0, [1, 2]], ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert metrics.recall_at_k(np.ones((4, 4)), range(4), ks=(1, 4)) == {1: 0.0, 4: 1.0}  # ties count against

    rng = np.random.default_rng(0)  # against an argsort ranking (no ties with random floats)
    sim = rng.normal(size=(50, 30))
    pos = rng.integers(0, 30, size=50)
    order = np.argsort(-sim, axis=1)
    rank = np.array([np.where(order[q] == pos[q])[0][0] for q in range(50)])
    assert metrics.recall_at_k(sim, pos.tolist(), ks=(1, 5, 10)) == {k: np.mean(rank < k) for k in (1, 5, 10)}
    with pytest.raises(ValueError, match=r"positives\[0\]"):
        metrics.recall_at_k(sim, [30] * 50)
