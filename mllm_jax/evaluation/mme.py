"""MME (the release directory) -> perception and cognition scores as the official ``eval_tool/
calculation.py``: per subtask accuracy + accuracy+ (both of an image's two questions right), x100 and
summed; a subtask's answer is read as the tool reads it (``yes`` / ``no`` in its first 4 characters).

Layout (``--data=MME_Benchmark_release_version``): one directory per subtask (``existence``, ``OCR``,
``code_reasoning``, ...), each with question files ``NAME.txt`` of ``question<TAB>Yes|No`` lines, either
beside the images (``existence/000000006040.jpg`` + ``.txt``) or split into ``images/`` and
``questions_answers_YN/`` (``artwork``, ``celebrity``, ``landmark``, ``posters``, ``scene``). Subtasks that
are absent are left out of the sums (the official totals need all 14).
"""

from __future__ import annotations

import os

import numpy as np

from mllm_jax.evaluation import benchmark

PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
PERCEPTION = "existence count position color posters celebrity scene landmark artwork OCR".split()
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTS = (".jpg", ".png", ".jpeg")


def parse(text: str) -> str:
    """``yes``, ``no`` or ``other``, as the official tool's ``parse_pred_ans``."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def _pairs(task_dir: str):
    """(question file, image directory) of one subtask in either layout."""
    split = os.path.join(task_dir, "questions_answers_YN")
    if os.path.isdir(split):
        return [(os.path.join(split, n), os.path.join(task_dir, "images")) for n in sorted(os.listdir(split))]
    return [(os.path.join(task_dir, n), task_dir) for n in sorted(os.listdir(task_dir)) if n.endswith(".txt")]


def load(files, root, split, skipped):
    base = files[0]
    if not os.path.isdir(base):
        raise benchmark.layout_error(base, "the MME release directory (one directory per subtask)")
    present = [t for t in (*PERCEPTION, *COGNITION) if os.path.isdir(os.path.join(base, t))]
    if not present:
        raise benchmark.layout_error(base, f"subtask directories such as {PERCEPTION[0]}/ or {COGNITION[0]}/")
    rows = []
    for task in present:
        for txt, image_dir in _pairs(os.path.join(base, task)):
            stem = os.path.splitext(os.path.basename(txt))[0]
            images = [stem + e for e in IMAGE_EXTS if os.path.isfile(os.path.join(image_dir, stem + e))]
            with open(txt, encoding="utf-8") as f:
                lines = [x.rstrip("\n") for x in f if x.strip()]
            rows += [(task, image_dir, images[0] if images else stem + ".jpg", x) for x in lines]

    def make(row):
        task, image_dir, name, text = row
        question, _, answer = text.rpartition("\t")
        if not question or answer.strip().lower() not in ("yes", "no"):
            raise ValueError(f"not 'question<TAB>Yes|No': {text[:60]!r}")
        image = benchmark.image_path(image_dir, name, skipped)
        if image is None:
            return None
        rel = os.path.relpath(image, base)
        return {
            "id": rel,
            "image": image,
            "subtask": task,
            "question": question,
            "answer": answer.strip().lower(),
        }

    return benchmark.collect(rows, make, skipped, base)


def subtask_scores(lines) -> dict:
    """``{"acc", "acc_plus", "score"}`` of one subtask's lines (an image's questions are grouped)."""
    hits = [parse(x["prediction"]) == x["answer"] for x in lines]
    by_image: dict[str, list[bool]] = {}
    for line, hit in zip(lines, hits, strict=True):
        by_image.setdefault(line["image"], []).append(hit)
    acc, acc_plus = float(np.mean(hits)), float(np.mean([all(h) for h in by_image.values()]))
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * acc + 100 * acc_plus}


def score(lines) -> dict:
    rows, totals = {}, {"perception": 0.0, "cognition": 0.0}
    for category, tasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
        for task in tasks:
            mine = [x for x in lines if x["subtask"] == task]
            if mine:
                s = subtask_scores(mine)
                key = task.lower()
                rows |= {key: s["score"], f"{key}/acc": s["acc"], f"{key}/acc_plus": s["acc_plus"]}
                totals[category] += s["score"]
    return totals | rows


TASK = benchmark.Benchmark("mme", load, (1, 1), PROMPT, 16, score)
