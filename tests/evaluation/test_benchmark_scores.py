"""Each benchmark's scorer against the official script's logic (reference_benchmarks.py) on hand-made
predictions, the tricky answer-parsing and normalisation cases included; no model."""

import random

import pytest
import reference_benchmarks as ref
import reference_pope_eval

from mllm_jax.evaluation import answers, gqa, mmbench, mme, okvqa, pope, scienceqa, seed, textvqa, vizwiz


def test_gqa_equals_eval_py():
    texts = ["Yes.", "yes", "Cup", "cup.", "cup..", "a cup", "no", "No", "YES!", "red", " red"]
    types = [("verify", "attr"), ("query", "rel"), ("choose", "obj"), ("logical", "attr"), ("compare", "cat")]
    gold = ["yes", "cup", "no", "red"]
    rng = random.Random(0)
    questions, lines = {}, []
    for i in range(60):
        s, m = rng.choice(types)
        questions[str(i)] = {"answer": rng.choice(gold), "types": {"structural": s, "semantic": m}}
        questions[str(i)]["isBalanced"] = True
        lines.append({"id": str(i), "answer": questions[str(i)]["answer"], "structural": s, "semantic": m})
        lines[-1]["prediction"] = rng.choice(texts)
    want = ref.gqa_scores(questions, [{"question_id": x["id"], "text": x["prediction"]} for x in lines])
    assert gqa.score(lines) == pytest.approx(want, abs=1e-12)
    assert 0 < want["accuracy"] < 1
    assert gqa.normalize("Cup..") == "cup" and gqa.normalize("a cup") == "a cup"  # no article stripping


EVALAI_CASES = [
    "Dakota", "dakota.", "the dakota", "Dakota's", "dakota digital", "10:10", "ten", "10", "Two", "it's",
    "dont", "don't", "yes?", "1,000", "1000", "copenhagen.", "Copenhagen!", "unanswerable", "Unanswerable.",
    "navy-blue", "navy blue", "blue", "u.s.a.", "e-mail", "$5", "5 dollars", "a/c", "\n blue\t",
]  # fmt: skip


def test_evalai_processor_equals_mmf():
    processor = ref.EvalAIAnswerProcessor()
    for text in EVALAI_CASES:
        assert answers.evalai_answer(text) == processor(text), text


def test_textvqa_equals_m4c_evaluator():
    rng = random.Random(1)
    pool = ["dakota", "Dakota", "dakota digital", "the dakota", "clos culombu", "10", "ten", "copenhagen."]
    lines = []
    for _ in range(80):
        gts = [rng.choice(pool) for _ in range(10)] if rng.random() < 0.8 else [rng.choice(pool)] * 10
        lines.append({"prediction": rng.choice(pool + EVALAI_CASES), "answers": gts})
    want = ref.textvqa_accuracy([{"pred_answer": x["prediction"], "gt_answers": x["answers"]} for x in lines])
    assert textvqa.score(lines) == pytest.approx({"accuracy": want}, abs=1e-12)
    assert 0 < want < 1


def test_vizwiz_and_okvqa_equal_vqa_eval(capsys):
    rng = random.Random(2)
    pool = ["unanswerable", "Unanswerable", "unsuitable", "blue", "navy blue", "Blue.", "two", "2"]
    kinds = ["unanswerable", "other", "yes/no", "number"]
    lines = []
    for _ in range(80):
        gts = [rng.choice(pool) for _ in range(10)] if rng.random() < 0.8 else [rng.choice(pool)] * 10
        lines.append(
            {"prediction": rng.choice(pool + EVALAI_CASES), "answers": gts, "answer_type": rng.choice(kinds)}
        )
    overall, per_type = ref.vizwiz_accuracy(
        [(x["prediction"], x["answers"], x["answer_type"]) for x in lines]
    )
    capsys.readouterr()
    want = {"accuracy": overall} | {f"accuracy/{k.replace('/', '_')}": v for k, v in per_type.items()}
    assert vizwiz.score(lines) == pytest.approx(want, abs=1e-9)
    # OK-VQA: the raw prediction (no EvalAI processing), vqaEval's rule
    plain = [dict(x, prediction=ref.EvalAIAnswerProcessor()(x["prediction"])) for x in lines]
    got = okvqa.score(plain)
    assert got["accuracy"] == pytest.approx(overall, abs=1e-9)
    assert set(got) == set(want)


def test_scienceqa_equals_eval_science_qa():
    texts = ["A", "B", "C", "E", " B ", "A.", "B. bat", "C. rock\nmore", "The answer is B.", "A\n"]
    texts += ["The answer is C", "I think The answer is A.", "b", "", "A B", "(A)", "F", "Answer: A"]
    rng = random.Random(3)
    problems, lines = {}, []
    for i in range(120):
        n = rng.randint(2, 5)
        problems[str(i)] = {"choices": [f"c{k}" for k in range(n)], "answer": rng.randrange(n)}
        text = rng.choice(texts)
        line = {"id": str(i), "generated": text, "prediction": (text.strip().splitlines() or [""])[0]}
        line |= {"letters": list("ABCDE"[:n]), "answer": "ABCDE"[problems[str(i)]["answer"]]}
        line |= {
            "subject": rng.choice(["natural_science", "social_science"]),
            "has_context": rng.random() < 0.5,
        }
        lines.append(line | {"grade": rng.choice(["grade_1_6", ""])})
    hits = ref.scienceqa_correct(problems, {x["id"]: x["generated"].strip() for x in lines})
    got = scienceqa.score(lines)
    assert got["accuracy"] == pytest.approx(sum(hits.values()) / len(hits))
    for subject in ("natural_science", "social_science"):
        mine = [hits[x["id"]] for x in lines if x["subject"] == subject]
        assert got[f"accuracy/{subject}"] == pytest.approx(sum(mine) / len(mine))
    assert 0 < got["accuracy"] < 1
    assert (
        scienceqa.parse("B. bat", 2) == 1 and scienceqa.parse("E", 4) == -1 and scienceqa.parse("", 2) == -1
    )


def test_mme_equals_calculation_py():
    texts = ["Yes", "No", "yes.", "no, it is not", "Yes, there is", "Not sure", "nope", "I think yes"]
    texts += ["maybe", "YES", "nothing"]
    rng = random.Random(4)
    lines = []
    for task in ("existence", "OCR", "artwork", "code_reasoning", "text_translation"):
        for img in range(7):
            for gt in ("yes", "no"):
                line = {
                    "subtask": task,
                    "image": f"{task}/{img}.jpg",
                    "answer": gt,
                    "prediction": rng.choice(texts),
                }
                lines.append(line)
    got = mme.score(lines)
    totals = {"perception": 0.0, "cognition": 0.0}
    for task in ("existence", "OCR", "artwork", "code_reasoning", "text_translation"):
        rows = [
            f"{x['image']}\tq\t{x['answer'].title()}\t{x['prediction']}"
            for x in lines
            if x["subtask"] == task
        ]
        acc, acc_plus, score = ref.mme_task_score(rows)
        key = task.lower()
        assert (got[key], got[f"{key}/acc"], got[f"{key}/acc_plus"]) == pytest.approx((score, acc, acc_plus))
        totals["perception" if task in mme.PERCEPTION else "cognition"] += score
    assert (got["perception"], got["cognition"]) == pytest.approx((totals["perception"], totals["cognition"]))
    assert [mme.parse(t) for t in ("Not sure", "nope", "I think yes", "maybe")] == [
        "no",
        "no",
        "other",
        "other",
    ]


MMBENCH_ANSWERS = [
    "A",
    "B",
    "C",
    "D",
    "A.",
    "(B)",
    "The answer is C",
    "A and B",
    "red",
    "The color is green.",
]
MMBENCH_ANSWERS += ["blue or red", "Sorry, I can't help with images of people yet.", "Z", "I pick B: green"]
MMBENCH_ANSWERS += ["a", "none", "Answer: D"]


def test_mmbench_can_infer_and_circular_equal_vlmevalkit():
    rng = random.Random(5)
    for answer in MMBENCH_ANSWERS:
        for options in (["red", "green", "blue"], ["red", "green", "blue", "black"], ["yes", "no"]):
            choices = dict(zip("ABCD", options, strict=False))
            assert (mmbench.can_infer(answer, choices) or False) == ref.can_infer(answer, dict(choices)), (
                answer
            )
    lines, rows = [], []
    for group in range(40):
        options = ["red", "green", "blue", "black"][: rng.randint(2, 4)]
        answer = rng.randrange(len(options))
        category = rng.choice(["color recognition", "image_emotion"])
        record = {"id": group, "group": group, "options": options, "category": category, "rotate": True,
                  "answer_index": answer, "hint": "", "raw_question": "q", "image": "x"}  # fmt: skip
        for item in mmbench.expand(record):
            item["prediction"] = rng.choice(MMBENCH_ANSWERS + [item["answer"]] * 6)
            lines.append(item)
            rows.append(
                (
                    group,
                    item["prediction"],
                    dict(zip(item["letters"], item["options"], strict=True)),
                    item["answer"],
                )
            )
    got = mmbench.score(lines)
    assert got["circular_accuracy"] == pytest.approx(ref.mmbench_circular(rows))
    emotion = [r for r in rows if lines[rows.index(r)]["category"] == "image_emotion"]
    assert got["circular_accuracy/image_emotion"] == pytest.approx(ref.mmbench_circular(emotion))
    assert "circular_accuracy/color_recognition" in got and 0 < got["circular_accuracy"] < got["accuracy"] < 1


def test_mmbench_rotations_move_the_answer_letter():
    record = {"id": 3, "group": 3, "options": ["red", "green", "blue"], "category": "c", "rotate": True,
              "answer_index": 2, "hint": "A hint.", "raw_question": "Which?", "image": "x"}  # fmt: skip
    items = mmbench.expand(record)
    assert [i["options"][ord(i["answer"]) - 65] for i in items] == ["blue"] * 3
    assert items[1]["question"] == "A hint.\nWhich?\nA. green\nB. blue\nC. red"


def test_seed_equals_llava_eval_single():
    rng = random.Random(6)
    questions, lines = [], []
    for i in range(60):
        t = rng.choice([1, 2, 4])
        q = {"question_id": str(i), "answer": rng.choice("ABCD"), "question_type_id": t, "data_type": "image"}
        questions.append(q)
        pred = rng.choice(["A", "B", "C", "D", "A.", "(A)", "a"])
        lines.append({"id": str(i), "answer": q["answer"], "dimension": f"d{t}", "prediction": pred})
    per, total = ref.seed_scores(
        questions, [{"question_id": x["id"], "text": x["prediction"]} for x in lines]
    )
    got = seed.score(lines)
    assert got == pytest.approx({"accuracy": total} | {f"accuracy/d{t}": v for t, v in per.items()})


def test_pope_task_score_is_per_split_and_mean():
    lines, want = [], {}
    rng = random.Random(7)
    for split in ("random", "popular", "adversarial"):
        preds = [rng.choice(["Yes", "No", "no.", "yes, there is"]) for _ in range(20)]
        labels = [rng.choice(["yes", "no"]) for _ in range(20)]
        lines += [{"split": split, "prediction": p, "label": g} for p, g in zip(preds, labels, strict=True)]
        want[split] = reference_pope_eval.eval_pope(preds, labels)
    got = pope.score(lines)
    for split, metrics in want.items():
        for k, v in metrics.items():
            assert got[f"{split}/{k}"] == pytest.approx(v)
    assert got["f1"] == pytest.approx(sum(m["f1"] for m in want.values()) / 3)
