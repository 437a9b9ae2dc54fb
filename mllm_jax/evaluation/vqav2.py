"""VQAv2 (questions, optionally annotations) -> VQAv2 accuracy as the official script computes it and
exact match, overall and per answer type; without annotations (test-dev) only the predictions."""

from __future__ import annotations

import numpy as np

from mllm_jax.evaluation import loaders, metrics
from mllm_jax.evaluation.file_task import FileTask


def _load(files, image_root, split):
    return loaders.load_vqav2(files[0], image_root, files[1] if len(files) > 1 else None, split=split)


def _reference(index, r):
    keep = ("answers", "answer_type")  # absent without annotations (test-dev)
    return {"id": r["question_id"], "image_id": r["image_id"], "question": r["question"]} | {
        k: r[k] for k in keep if k in r
    }


def _rows(lines, suffix: str = "") -> dict:
    preds, answers = [line["prediction"] for line in lines], [line["answers"] for line in lines]
    matches = [metrics.exact_match(line["prediction"], line["answers"]) for line in lines]
    return {
        f"vqa_accuracy{suffix}": metrics.mean_vqa_accuracy(preds, answers),
        f"exact_match{suffix}": float(np.mean(matches)),
    }


def _score(lines) -> dict:
    if not all("answers" in line for line in lines):
        return {}  # no public answers (test-dev): the predictions file is the result
    rows = _rows(lines)
    for t in sorted({line["answer_type"] for line in lines}):
        rows.update(_rows([line for line in lines if line["answer_type"] == t], f"/{t}"))
    return rows


# LLaVA-1.5's short-answer VQA prompt
TASK = FileTask(
    "vqav2",
    _load,
    (1, 2),
    "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:",
    ("question",),
    10,
    _reference,
    _score,
)
