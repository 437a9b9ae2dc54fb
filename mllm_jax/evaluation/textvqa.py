"""TextVQA (``TextVQA_0.5.1_val.json``) -> TextVQA accuracy as MMF's evaluator (LLaVA's
``eval_textvqa.py``): VQA accuracy with both sides through the EvalAI answer processor.

File: ``{"dataset_name": "textvqa", "data": [{"question_id": 34602, "question": "...", "image_id":
"003a8ae2ef43b901", "answers": ["nokia", ...10], ...}, ...]}``; images ``{image_root}/{image_id}.jpg``
(the val questions ask about ``train_images/``). The test file has no answers: only the submission.

Optional second file: the Rosetta OCR tokens (``TextVQA_Rosetta_OCR_v0.2_val.json``: ``{"data": [{"image_id",
"ocr_tokens": [...]}, ...]}``); with it each question carries ``Reference OCR token: a, b, ...`` on the line
after it, as in LLaVA-1.5's ``llava_textvqa_val_v051_ocr.jsonl`` (the setting of its reported figure).
"""

from __future__ import annotations

import json

import numpy as np

from mllm_jax.evaluation import answers, benchmark

PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"


def ocr_tokens(path: str) -> dict[str, list[str]]:
    data = benchmark.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise benchmark.layout_error(path, '{"data": [{"image_id", "ocr_tokens": [...]}]}')
    rows = [r for r in data["data"] if isinstance(r, dict) and isinstance(r.get("ocr_tokens"), list)]
    return {str(r.get("image_id")): [str(t) for t in r["ocr_tokens"]] for r in rows}


def load(files, root, split, skipped):
    ocr = ocr_tokens(files[1]) if len(files) > 1 else None
    data = benchmark.read_json(files[0])
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise benchmark.layout_error(files[0], '{"data": [{"question_id", "question", "image_id", ...}]}')

    def make(q):
        record = {"id": benchmark.field(q, "question_id", int), "question": benchmark.field(q, "question")}
        if ocr is not None and ocr.get(q.get("image_id")):
            record["question"] += "\nReference OCR token: " + ", ".join(ocr[q["image_id"]])
        if "answers" in q:
            gts = benchmark.field(q, "answers", list)
            if not gts or not all(isinstance(a, str) for a in gts):
                raise ValueError("'answers' must be a non-empty list of strings")
            record["answers"] = gts
        image = benchmark.image_path(root, benchmark.field(q, "image_id") + ".jpg", skipped)
        return record | {"image": image} if image else None

    return benchmark.collect(data["data"], make, skipped, files[0])


def score(lines) -> dict:
    if not all("answers" in line for line in lines):
        return {}
    return {
        "accuracy": float(np.mean([answers.textvqa_accuracy(x["prediction"], x["answers"]) for x in lines]))
    }


def submission(lines):
    """EvalAI's TextVQA results file."""
    return ".json", json.dumps([{"question_id": x["id"], "answer": x["prediction"]} for x in lines])


TASK = benchmark.Benchmark("textvqa", load, (1, 2), PROMPT, 16, score, submission=submission)
