"""GQA (balanced questions JSON) -> exact-match accuracy as the official ``eval.py`` computes it, with
LLaVA-1.5's answer normalisation (``rstrip(".").lower()``), overall, binary / open and per type.

File: ``testdev_balanced_questions.json`` (or any split's questions file):
``{"201307251": {"imageId": "n435808", "question": "...", "answer": "no", "types": {"structural":
"verify", "semantic": "attr", ...}, "isBalanced": true, ...}, ...}``; images ``{image_root}/{imageId}.jpg``.
Questions with ``"isBalanced": false`` are left out (the official accuracy counts balanced ones only).
"""

from __future__ import annotations

import json

import numpy as np

from mllm_jax.evaluation import benchmark

PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"


def normalize(prediction: str) -> str:
    """LLaVA's ``convert_gqa_for_submission.py``: trailing periods off, lower case."""
    return prediction.rstrip(".").lower()


def load(files, root, split, skipped):
    data = benchmark.read_json(files[0])
    if not isinstance(data, dict) or not all(isinstance(q, dict) for q in list(data.values())[:10]):
        raise benchmark.layout_error(files[0], '{"<questionId>": {"imageId", "question", ...}, ...}')

    def make(item):
        qid, q = item
        if q.get("isBalanced") is False:
            return None
        types = q.get("types") or {}
        image = benchmark.image_path(root, benchmark.field(q, "imageId") + ".jpg", skipped)
        record = {"id": str(qid), "image": image, "question": benchmark.field(q, "question")}
        if "answer" in q:
            record |= {"answer": benchmark.field(q, "answer"), "structural": types.get("structural", "")}
            record["semantic"] = types.get("semantic", "")
        return record if image else None

    return benchmark.collect(data.items(), make, skipped, files[0])


def _accuracy(lines) -> float:
    return float(np.mean([normalize(line["prediction"]) == line["answer"] for line in lines]))


def score(lines) -> dict:
    if not all("answer" in line for line in lines):
        return {}  # test split: the submission file is the result
    rows = {"accuracy": _accuracy(lines)}
    kinds = {"binary": [x for x in lines if x["structural"] != "query"]}
    kinds["open"] = [x for x in lines if x["structural"] == "query"]
    rows |= {k: _accuracy(v) for k, v in kinds.items() if v}
    for key in ("structural", "semantic"):
        for t in sorted({line[key] for line in lines} - {""}):
            rows[f"{key}/{t}"] = _accuracy([x for x in lines if x[key] == t])
    return rows


def submission(lines):
    """The GQA server's predictions file."""
    rows = [{"questionId": x["id"], "prediction": normalize(x["prediction"])} for x in lines]
    return ".json", json.dumps(rows)


TASK = benchmark.Benchmark("gqa", load, (1, 1), PROMPT, 16, score, submission=submission)
