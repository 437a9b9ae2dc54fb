"""SEED-Bench (``SEED-Bench.json``) -> multiple-choice accuracy over the image dimensions (1-9) and per
dimension, as LLaVA's ``convert_seed_for_submission.py`` scores it (the answer must be the letter
itself); video questions are left out.

File: ``{"question_type": {"Scene Understanding": 1, ...}, "questions": [{"question_id": "101669",
"question": "...", "choice_a": "...", ..., "choice_d": "...", "answer": "A", "data_id":
"1454426_2591111986.jpg", "data_type": "image", "question_type_id": 1}, ...]}``; images
``{image_root}/{data_id}`` (the release's ``SEED-Bench-image/``).
"""

from __future__ import annotations

import json

import numpy as np

from mllm_jax.evaluation import benchmark

PROMPT = (
    "USER: <image>\n{question}\nAnswer with the option's letter from the given choices directly. ASSISTANT:"
)
CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


def _dimension(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def load(files, root, split, skipped):
    data = benchmark.read_json(files[0])
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise benchmark.layout_error(files[0], '{"question_type": {...}, "questions": [...]}')
    names = {v: _dimension(k) for k, v in (data.get("question_type") or {}).items() if isinstance(v, int)}

    def make(q):
        if q.get("data_type", "image") != "image":
            return None
        options = [benchmark.field(q, c) for c in CHOICES]
        dimension = benchmark.field(q, "question_type_id", int)
        record = {
            "id": str(benchmark.field(q, "question_id", (str, int))),
            "question": f"{benchmark.field(q, 'question')}\n{benchmark.options_text(options)}",
            "letters": list(benchmark.LETTERS[:4]),
            "dimension": names.get(dimension, str(dimension)),
        }
        if "answer" in q:
            record["answer"] = benchmark.field(q, "answer")
        image = benchmark.image_path(root, benchmark.field(q, "data_id"), skipped)
        return record | {"image": image} if image else None

    return benchmark.collect(data["questions"], make, skipped, files[0])


def score(lines) -> dict:
    if not all("answer" in x for x in lines):
        return {}
    hits = {x["id"]: x["prediction"] == x["answer"] for x in lines}
    rows = {"accuracy": float(np.mean(list(hits.values())))}
    for name in sorted({x["dimension"] for x in lines}):
        rows[f"accuracy/{name}"] = float(np.mean([hits[x["id"]] for x in lines if x["dimension"] == name]))
    return rows


def submission(lines):
    """The SEED-Bench leaderboard's JSON lines: ``{"question_id", "prediction"}``."""
    return ".jsonl", "".join(
        json.dumps({"question_id": x["id"], "prediction": x["prediction"]}) + "\n" for x in lines
    )


TASK = benchmark.Benchmark(
    "seed", load, (1, 1), PROMPT, 16, score, submission=submission, multiple_choice=True
)
