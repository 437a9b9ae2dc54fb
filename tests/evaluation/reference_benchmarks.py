"""Reference for the tests only (never imported by the package): the official scoring of each benchmark,
re-implemented literally from the scripts named below (their order of operations, string tests and
quirks), with file reading replaced by lists of plain dicts.

- GQA: LLaVA ``scripts/convert_gqa_for_eval.py`` (``text.rstrip('.').lower()``) + GQA ``eval.py``
  (accuracy over balanced questions, ``open`` = structural type ``query``, else ``binary``, per type).
- TextVQA: MMF ``EvalAIAnswerProcessor`` + ``TextVQAAccuracyEvaluator`` (LLaVA ``m4c_evaluator.py``).
- VizWiz: LLaVA ``convert_vizwiz_for_submission.py`` (EvalAI processor) scored by the official VQA
  ``vqaEval.py`` (reference_vqa_eval.py).
- ScienceQA: LLaVA ``llava/eval/eval_science_qa.py`` (answer parsing, ``get_pred_idx``).
- MME: ``eval_tool/calculation.py`` (chunks of 2 lines per image, ``parse_pred_ans``, acc + acc_plus).
- MMBench: VLMEvalKit ``can_infer`` / ``can_infer_option`` / ``can_infer_text`` and circular grouping.
- SEED-Bench: LLaVA ``scripts/convert_seed_for_submission.py`` ``eval_single``.
"""

import copy
import re
import string

import reference_vqa_eval

# ------------------------------------------------------------------------------------------ EvalAI / MMF


class _QA:
    def __init__(self, qa):
        self.qa = qa

    def getQuesIds(self):  # noqa: N802 - the official API's name
        return list(self.qa)


class EvalAIAnswerProcessor:
    # MMF's tables are the VQA script's (the same contractions and number words)
    CONTRACTIONS = reference_vqa_eval.VQAEval(_QA({}), _QA({})).contractions
    NUMBER_MAP = reference_vqa_eval.VQAEval(_QA({}), _QA({})).manualMap
    ARTICLES = ["a", "an", "the"]
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                    "`", ",", "?", "!"]  # fmt: skip

    def word_tokenize(self, word):
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text):
        out_text = in_text
        for p in self.PUNCTUATIONS:
            if (p + " " in in_text or " " + p in in_text) or (
                re.search(self.COMMA_STRIP, in_text) is not None
            ):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        out_text = self.PERIOD_STRIP.sub("", out_text, re.UNICODE)
        return out_text

    def process_digit_article(self, in_text):
        out_text = []
        for word in in_text.lower().split():
            word = self.NUMBER_MAP.setdefault(word, word)
            if word not in self.ARTICLES:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in self.CONTRACTIONS:
                out_text[word_id] = self.CONTRACTIONS[word]
        return " ".join(out_text)

    def __call__(self, item):
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        item = self.process_digit_article(item)
        return item


def textvqa_accuracy(pred_list):
    """``[{"pred_answer", "gt_answers"}]`` -> mean accuracy (``TextVQAAccuracyEvaluator.eval_pred_list``)."""
    processor = EvalAIAnswerProcessor()
    scores = []
    for entry in pred_list:
        pred_answer = processor(entry["pred_answer"])
        answers = [processor(a) for a in entry["gt_answers"]]
        gt_answers = list(enumerate(answers))
        unique_answer_scores = {}
        for unique_answer in set(answers):
            accs = []
            for gt_answer in gt_answers:
                other_answers = [item for item in gt_answers if item != gt_answer]
                matching_answers = [item for item in other_answers if item[1] == unique_answer]
                accs.append(min(1, float(len(matching_answers)) / 3))
            unique_answer_scores[unique_answer] = sum(accs) / len(accs)
        scores.append(unique_answer_scores.get(pred_answer, 0.0))
    return sum(scores) / len(scores)


def vizwiz_accuracy(rows):
    """``[(prediction, answers, answer_type)]`` -> (overall, {answer_type: acc}) by vqaEval.py on the
    EvalAI-processed predictions (answer ids added, as the VQA API's annotations carry them)."""
    processor = EvalAIAnswerProcessor()
    gts, res = {}, {}
    for qid, (pred, answers, kind) in enumerate(rows):
        gts[qid] = {
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
            "question_type": "none",
            "answer_type": kind,
        }
        res[qid] = {"answer": processor(pred)}
    evaluator = reference_vqa_eval.VQAEval(_QA(copy.deepcopy(gts)), _QA(res), n=10)
    evaluator.evaluate()
    return evaluator.accuracy["overall"] / 100, {
        k: v / 100 for k, v in evaluator.accuracy["perAnswerType"].items()
    }


# ------------------------------------------------------------------------------------------------- GQA


def gqa_scores(questions, results):
    """``questions``: {qid: {"answer", "types": {"structural", "semantic"}, "isBalanced"}};
    ``results``: [{"question_id", "text"}] (LLaVA's answers) -> the eval.py scores (fractions)."""
    predictions = {r["question_id"]: r["text"].rstrip(".").lower() for r in results}
    scores = {"accuracy": [], "binary": [], "open": [], "structural": {}, "semantic": {}}
    for qid, question in questions.items():
        if question["isBalanced"]:
            gold = question["answer"]
            predicted = predictions[qid]
            correct = predicted == gold
            scores["accuracy"].append(correct)
            scores["structural"].setdefault(question["types"]["structural"], []).append(correct)
            scores["semantic"].setdefault(question["types"]["semantic"], []).append(correct)
            answer_type = "open" if question["types"]["structural"] == "query" else "binary"
            scores[answer_type].append(correct)
    avg = lambda xs: float(sum(xs)) / len(xs)  # noqa: E731
    out = {k: avg(scores[k]) for k in ("accuracy", "binary", "open") if scores[k]}
    for kind in ("structural", "semantic"):
        out |= {f"{kind}/{t}": avg(v) for t, v in scores[kind].items()}
    return out


# -------------------------------------------------------------------------------------------- ScienceQA


def scienceqa_correct(problems, predictions, options=("A", "B", "C", "D", "E")):
    """``problems``: {pid: {"choices", "answer"}}; ``predictions``: {pid: text} -> {pid: correct}."""
    options = list(options)

    def get_pred_idx(prediction, choices):
        prediction = prediction.replace("\n", ". ")
        if prediction in options[: len(choices)]:
            return options.index(prediction)
        match = re.compile(r"^([A-E])\. ").search(prediction)
        if match and match.group(1) in options[: len(choices)]:
            return options.index(match.group(1))
        for pattern in (r"The answer is ([A-E])\.", r"The answer is ([A-E])"):
            match = re.compile(pattern).search(prediction)
            if match and match.group(1) in options[: len(choices)]:
                return options.index(match.group(1))
        return -1

    out = {}
    for pid, prob in problems.items():
        pred_text = predictions[pid].replace("\n", ". ")
        if pred_text.strip() in options:
            answer = pred_text.strip()
        elif len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
            answer = pred_text[0]
        elif "The answer is " in pred_text:
            match = re.compile(r"The answer is ([A-E])\.").search(pred_text)
            if match:
                answer = match.group(1)
            else:
                match = re.compile(r"The answer is ([A-E])").search(pred_text)
                answer = match.group(1) if match else "FAILED"
        else:
            answer = "FAILED"
        out[pid] = get_pred_idx(answer, prob["choices"]) == prob["answer"]
    return out


# ------------------------------------------------------------------------------------------------- MME


def mme_task_score(result_lines):
    """One subtask's result file lines ``img\\tquestion\\tgt\\tpred`` -> (acc, acc_plus, score)."""

    def parse_pred_ans(pred_ans):
        if pred_ans in ["yes", "no"]:
            return pred_ans
        prefix_pred_ans = pred_ans[:4]
        if "yes" in prefix_pred_ans:
            return "yes"
        elif "no" in prefix_pred_ans:
            return "no"
        return "other"

    chunks = [result_lines[i : i + 2] for i in range(0, len(result_lines), 2)]
    gts, preds, acc_plus_correct_num = [], [], 0
    for img_items in chunks:
        assert len(img_items) == 2
        img_correct_num = 0
        for img_item in img_items:
            img_name, question, gt_ans, pred_ans = img_item.split("\t")
            gt_ans, pred_ans = gt_ans.lower(), parse_pred_ans(pred_ans.lower())
            gts.append(gt_ans)
            preds.append(pred_ans)
            img_correct_num += gt_ans == pred_ans
        acc_plus_correct_num += img_correct_num == 2
    acc = sum(g == p for g, p in zip(gts, preds, strict=True)) / len(gts)
    acc_plus = acc_plus_correct_num / len(chunks)
    return acc, acc_plus, acc * 100 + acc_plus * 100


# --------------------------------------------------------------------------------------------- MMBench


def can_infer_option(answer, choices):
    reject_to_answer = [
        "Sorry, I can't help with images of people yet.",
        "I can't process this file.",
        "I'm sorry, but without the image provided",
        "Cannot determine the answer",
    ]
    for err in reject_to_answer:
        if err in answer:
            return "Z"

    def count_choice(splits, choices, prefix="", suffix=""):
        return sum(prefix + c + suffix in splits for c in choices)

    answer_mod = copy.copy(answer)
    for c in ".()[],:;!*#{}":
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = count_choice(splits, choices)
    if count == 1:
        for ch in choices:
            if ch in splits:
                return ch
    elif count == 0 and count_choice(splits, {"Z", ""}) == 1:
        return "Z"
    return False


def can_infer_text(answer, choices):
    answer = answer.lower()
    choices = {k: str(v).lower() for k, v in choices.items()}
    for k in choices:
        assert k in string.ascii_uppercase
    cands = [k for k in choices if choices[k] in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer, choices):
    answer = str(answer)
    copt = can_infer_option(answer, choices)
    return copt if copt else can_infer_text(answer, choices)


def mmbench_circular(rows):
    """``[(group, prediction, {letter: option}, answer letter)]`` -> fraction of groups all right."""
    groups = {}
    for group, pred, choices, answer in rows:
        groups.setdefault(group, []).append(can_infer(pred, dict(choices)) == answer)
    return sum(all(v) for v in groups.values()) / len(groups)


# ------------------------------------------------------------------------------------------ SEED-Bench


def seed_scores(questions, results):
    """``questions``: [{"question_id", "answer", "question_type_id", "data_type"}]; ``results``: JSON lines
    ``{"question_id", "text"}`` -> ({type id: accuracy}, total accuracy), fractions."""
    results = {r["question_id"]: r for r in results}
    type_counts, correct_counts = {}, {}
    for q in questions:
        if q["data_type"] != "image":
            continue
        data_type = q["question_type_id"]
        type_counts[data_type] = type_counts.get(data_type, 0) + 1
        qid = q["question_id"]
        if qid not in results:
            correct_counts[data_type] = correct_counts.get(data_type, 0)
            continue
        if results[qid]["text"] == q["answer"]:
            correct_counts[data_type] = correct_counts.get(data_type, 0) + 1
        else:
            correct_counts.setdefault(data_type, 0)
    per = {t: correct_counts[t] / type_counts[t] for t in sorted(type_counts)}
    return per, sum(correct_counts.values()) / sum(type_counts.values())
