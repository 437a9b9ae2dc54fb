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

from collections.abc import Sequence

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
