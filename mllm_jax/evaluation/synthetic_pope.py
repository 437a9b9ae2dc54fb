"""POPE on the built-in held-out scenes: yes / no object-existence questions ("is there a red circle in
the image ?") with random, popular and adversarial negatives (``data/existence.py``), scored by the
official POPE reading of the answers (``pope.pope_metrics``).

Rows: ``eval/pope_accuracy``, ``eval/pope_f1``, ``eval/pope_yes_ratio`` over all questions (the three
kinds in equal parts, half of each yes), and per kind ``eval/pope_<metric>/<kind>`` (precision and
recall too). ``python -m mllm_jax.evaluate --task=synthetic_pope`` prints the same keys.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.data.existence import NEGATIVE_TYPES, pope_items
from mllm_jax.data.layouts import IMAGE
from mllm_jax.evaluation.decoder import Decoder
from mllm_jax.evaluation.pope import pope_metrics

MAX_NEW_TOKENS = 3  # "yes" / "no", EOS and a spare
HEADLINE = ("accuracy", "f1", "yes_ratio")


def rows_of(answers: list[str], items: list[dict]) -> dict:
    """The ``eval/pope_*`` rows of raw ``answers`` to ``items``."""
    labels = [it["answer"] for it in items]
    overall = pope_metrics(answers, labels)
    rows = {f"eval/pope_{k}": overall[k] for k in HEADLINE}
    kinds = np.array([it["type"] for it in items])
    for kind in NEGATIVE_TYPES:
        picked = np.flatnonzero(kinds == kind)
        if not len(picked):
            continue
        scores = pope_metrics([answers[i] for i in picked], [labels[i] for i in picked])
        rows |= {f"eval/pope_{k}/{kind}": v for k, v in scores.items()}
    return rows


def _scored(decoder: Decoder, synthetic_config, num_questions: int):
    items = pope_items(synthetic_config, num_questions)
    # the raw text: POPE reads "no" / "not" anywhere in the first sentence, not just the first word
    spec = decoder.replace(max_new_tokens=MAX_NEW_TOKENS)
    answers = spec.answer(
        items,
        lambda it: [("user", f"{IMAGE} {it['question']}")],
        lambda it: spec.image_spec(it["image"])[None],
        str.strip,
    )
    return rows_of(answers, items), items, answers


def pope_rows(decoder: Decoder, synthetic_config, num_questions: int) -> dict:
    """``eval/pope_*`` over ``num_questions`` held-out questions (training's evaluation)."""
    return _scored(decoder, synthetic_config, num_questions)[0]


def predictions(decoder: Decoder, synthetic_config, num_questions: int) -> tuple[dict, list[dict]]:
    """The metrics and one prediction line per question (``evaluate --task=synthetic_pope``)."""
    rows, items, answers = _scored(decoder, synthetic_config, num_questions)
    lines = [
        {
            "id": i,
            "type": item["type"],
            "question": item["question"],
            "prediction": answer,
            "answers": [item["answer"]],
        }
        for i, (item, answer) in enumerate(zip(items, answers, strict=True))
    ]
    return rows, lines
