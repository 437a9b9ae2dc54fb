"""VizWiz-VQA (``val.json`` / ``test.json``) -> VQA accuracy (the official evaluation is the VQA code:
``metrics.vqa_accuracy``) of the prediction as LLaVA's ``convert_vizwiz_for_submission.py`` submits it
(through the EvalAI answer processor), overall and per answer type (``unanswerable`` included).

File: ``[{"image": "VizWiz_val_00000000.jpg", "question": "...", "answers": [{"answer": "...",
"answer_confidence": "yes"}, ...10], "answer_type": "other", "answerable": 1}, ...]``; images
``{image_root}/{image}``. The test file has no answers: only the submission (EvalAI's
``[{"image", "answer"}]``).
"""

from __future__ import annotations

import json

import numpy as np

from mllm_jax.evaluation import answers, benchmark, metrics

PROMPT = (
    "USER: <image>\n{question}\nWhen the provided information is insufficient, respond with "
    "'Unanswerable'.\nAnswer the question using a single word or phrase. ASSISTANT:"
)


def load(files, root, split, skipped):
    data = benchmark.read_json(files[0])
    if not isinstance(data, list):
        raise benchmark.layout_error(files[0], '[{"image", "question", "answers", "answer_type"}, ...]')

    def make(q):
        name = benchmark.field(q, "image")
        record = {"id": name, "question": benchmark.field(q, "question")}
        if "answers" in q:
            gts = [benchmark.field(a, "answer") for a in benchmark.field(q, "answers", list)]
            if not gts:
                raise ValueError("no answers")
            record |= {"answers": gts, "answer_type": q.get("answer_type", "other")}
        image = benchmark.image_path(root, name, skipped)
        return record | {"image": image} if image else None

    return benchmark.collect(data, make, skipped, files[0])


def _accuracy(lines) -> float:
    return float(
        np.mean([metrics.vqa_accuracy(answers.evalai_answer(x["prediction"]), x["answers"]) for x in lines])
    )


def score(lines) -> dict:
    if not all("answers" in line for line in lines):
        return {}
    rows = {"accuracy": _accuracy(lines)}
    for t in sorted({x["answer_type"] for x in lines}):
        rows[f"accuracy/{t.replace('/', '_')}"] = _accuracy([x for x in lines if x["answer_type"] == t])
    return rows


def submission(lines):
    rows = [{"image": x["id"], "answer": answers.evalai_answer(x["prediction"])} for x in lines]
    return ".json", json.dumps(rows)


TASK = benchmark.Benchmark("vizwiz", load, (1, 1), PROMPT, 16, score, submission=submission)
