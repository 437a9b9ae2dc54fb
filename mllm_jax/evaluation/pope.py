"""POPE (object hallucination, yes/no questions): the official scorer and the file-format task.

The scorer, shared with every POPE-style evaluation (the synthetic one included)::

    pope_answer(text: str) -> "yes" | "no"
    pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict
        {"accuracy", "precision", "recall", "f1", "yes_ratio"}  (floats in [0, 1])

``predictions`` are the model's raw answers, ``labels`` the ground truth ``"yes"`` / ``"no"``. Each answer
is read as the POPE repo's ``evaluate.py`` (and LLaVA's ``eval_pope.py``) reads it: only the text before
the first ``.`` counts, commas are dropped, and the answer is "no" if one of its space-separated words is
exactly ``No``, ``no`` or ``not``, otherwise "yes" (so ``"Nope"`` and an empty answer are yes). "yes" is the
positive class. Where the official script would divide by zero (no positive prediction, say) the metric
is 0.0 instead of a crash.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mllm_jax.evaluation import benchmark

POPE_LABELS = ("yes", "no")
_NO_WORDS = frozenset(["No", "not", "no"])


def pope_answer(text: str) -> str:
    """``"yes"`` or ``"no"`` as the official script reads a generated answer."""
    if "." in text:  # only the first sentence
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 (of "yes") and the share of "yes" answers, as the official tool."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels (>0): {len(predictions)} vs {len(labels)}")
    bad = [x for x in labels if x not in POPE_LABELS]
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad[0]!r}")
    pred_yes = [pope_answer(p) == "yes" for p in predictions]
    gold_yes = [x == "yes" for x in labels]
    pairs = list(zip(pred_yes, gold_yes, strict=True))
    tp = sum(p and g for p, g in pairs)
    fp = sum(p and not g for p, g in pairs)
    tn = sum(not p and not g for p, g in pairs)
    fn = sum(not p and g for p, g in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(sum(pred_yes), len(pairs)),
    }


# ---------------------------------------------------------------------------------------------------------
# The POPE file-format task (``--task=pope``)
# ---------------------------------------------------------------------------------------------------------

PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
PREFIXES = ("coco_pope_", "aokvqa_pope_", "gqa_pope_")


def split_name(path: str) -> str:
    """``coco_pope_adversarial.json`` -> ``adversarial`` (the official script's category)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    for prefix in PREFIXES:
        stem = stem.removeprefix(prefix)
    return stem


def load(files, root, split, skipped):
    records = []
    for path in files:
        name = split_name(path)
        if split is not None and name != split:
            continue

        def make(q, name=name):
            label = benchmark.field(q, "label")
            if label not in POPE_LABELS:
                raise ValueError(f"label {label!r}")
            record = {"id": benchmark.field(q, "question_id", int), "split": name, "label": label}
            record["question"] = benchmark.field(q, "text")
            image = benchmark.image_path(root, benchmark.field(q, "image"), skipped)
            return record | {"image": image} if image else None

        rows = benchmark.read_jsonl(path, skipped)
        if rows and not any(isinstance(r, dict) and "label" in r and "text" in r for r in rows[:10]):
            raise benchmark.layout_error(path, 'JSON lines {"question_id", "image", "text", "label"}')
        records += benchmark.collect(rows, make, skipped, path)
    return records


def score(lines) -> dict:
    """Per split ``{split}/{metric}``; the unprefixed metrics are their mean over the splits (LLaVA-1.5
    reports the mean F1 of random, popular and adversarial)."""
    splits = sorted({x["split"] for x in lines})
    per = {
        s: pope_metrics(*zip(*[(x["prediction"], x["label"]) for x in lines if x["split"] == s], strict=True))
        for s in splits
    }
    rows = {k: float(np.mean([per[s][k] for s in splits])) for k in per[splits[0]]}
    return rows | {f"{s}/{k}": v for s in splits for k, v in per[s].items()}


TASK = benchmark.Benchmark("pope", load, (1, 3), PROMPT, 16, score)
