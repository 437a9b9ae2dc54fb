"""OK-VQA (``OpenEnded_mscoco_val2014_questions.json`` + ``mscoco_val2014_annotations.json``, the VQAv2
layout) -> VQA accuracy as the official VQA evaluation (``metrics.vqa_accuracy``), the metric of the
Flamingo line; per answer type when the annotations carry several.

Images: ``{image_root}/COCO_val2014_{image_id:012d}.jpg`` (``--split`` overrides the file's
``data_subtype``).
"""

from __future__ import annotations

import json

import numpy as np

from mllm_jax.evaluation import benchmark, loaders, metrics

PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"


def _annotations(path: str, skipped) -> dict:
    data = benchmark.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise benchmark.layout_error(path, '{"annotations": [{"question_id", "answers", ...}]}')

    def make(a):
        gts = [benchmark.field(x, "answer") for x in benchmark.field(a, "answers", list)]
        if not gts:
            raise ValueError("no answers")
        return benchmark.field(a, "question_id", int), {
            "answers": gts,
            "answer_type": a.get("answer_type", "other"),
        }

    return dict(benchmark.collect(data["annotations"], make, skipped, path))


def load(files, root, split, skipped):
    data = benchmark.read_json(files[0])
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise benchmark.layout_error(
            files[0], '{"data_subtype", "questions": [{"question_id", "image_id", "question"}]}'
        )
    if split is None:
        subtype = data.get("data_subtype", "val2014")
        split = loaders.VQA_IMAGE_SPLITS.get(subtype, subtype)
    annotations = _annotations(files[1], skipped) if len(files) > 1 else None

    def make(q):
        qid, image_id = benchmark.field(q, "question_id", int), benchmark.field(q, "image_id", int)
        record = {"id": qid, "image_id": image_id, "question": benchmark.field(q, "question")}
        if annotations is not None:
            if qid not in annotations:
                raise ValueError(f"no annotation for question_id {qid}")
            record |= annotations[qid]
        image = benchmark.image_path(root, loaders.vqa_image_name(split, image_id), skipped)
        return record | {"image": image} if image else None

    return benchmark.collect(data["questions"], make, skipped, files[0])


def _accuracy(lines) -> float:
    return float(np.mean([metrics.vqa_accuracy(x["prediction"], x["answers"]) for x in lines]))


def score(lines) -> dict:
    if not all("answers" in line for line in lines):
        return {}
    rows = {"accuracy": _accuracy(lines)}
    types = sorted({x["answer_type"] for x in lines})
    if len(types) > 1:
        for t in types:
            rows[f"accuracy/{t.replace('/', '_')}"] = _accuracy([x for x in lines if x["answer_type"] == t])
    return rows


def submission(lines):
    """The VQA results format (``[{"question_id", "answer"}]``)."""
    return ".json", json.dumps([{"question_id": x["id"], "answer": x["prediction"]} for x in lines])


TASK = benchmark.Benchmark("okvqa", load, (1, 2), PROMPT, 16, score, submission=submission)
