"""VQA accuracy on the held-out built-in synthetic questions, by generating answers.

The headline ``eval/vqa_accuracy`` averages the question types in ``HEADLINE_TYPES``; every type is
also reported alone (``eval/vqa_accuracy/<type>``). Few-shot accuracy (``eval/vqa_accuracy_{k}shot``)
puts k solved examples from the train split, each with its own image, before the question.
``eval/vqa_accuracy_blank`` asks the same questions with blank (black) images: the gap between the
two shows the answers come from the image.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.data.fewshot import fewshot_turns, heldout_questions, support_questions
from mllm_jax.evaluation.decoder import Decoder

HEADLINE_TYPES = ("count", "color", "shape")
MAX_NEW_TOKENS = 3  # a one-word answer, EOS and a spare


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,?!").lower() if words else ""


def answer_questions(decoder: Decoder, items, blank: bool = False, supports=None) -> list[str]:
    """Greedy answers (first word of the generated text) for ``items`` with image + question;
    ``supports[i]`` (optional): the solved examples put before item ``i`` (few-shot), each with its image;
    ``blank``: the question's image is black."""
    spec = decoder.image_spec

    def pixels_NxHxWxC(asked):
        shots, item = asked
        own = np.zeros_like(item["image"]) if blank else item["image"]
        return np.stack([spec(s["image"]) for s in shots] + [spec(own)])

    asked = list(zip(supports or [[] for _ in items], items, strict=True))
    return decoder.answer(asked, lambda a: fewshot_turns(*a), pixels_NxHxWxC, first_word)


def accuracy_rows(answers, items, headline_types, suffix: str, metric: str = "vqa_accuracy") -> dict:
    """``eval/{metric}{suffix}`` over the items whose type is in ``headline_types``, and
    ``eval/{metric}{suffix}/<type>`` for every type (exact match of one-word answers)."""
    correct = np.array([a == it["answer"] for a, it in zip(answers, items, strict=True)])
    types = np.array([it["type"] for it in items])
    headline = np.isin(types, headline_types)
    rows = {f"eval/{metric}{suffix}": float(correct[headline].mean()) if headline.any() else 0.0}
    for t in sorted(set(types.tolist())):
        rows[f"eval/{metric}{suffix}/{t}"] = float(correct[types == t].mean())
    return rows


def _scored(decoder: Decoder, synthetic_config, num_questions: int, headline_types, shots):
    """The metrics, the held-out items and their answers (with the images)."""
    items = heldout_questions(synthetic_config, num_questions)
    rows: dict[str, float] = {}
    answers = {}
    for blank in (False, True):
        answers[blank] = answer_questions(decoder, items, blank)
        rows.update(accuracy_rows(answers[blank], items, headline_types, "_blank" if blank else ""))
    for k in shots:
        if k == 0:
            rows["eval/vqa_accuracy_0shot"] = rows["eval/vqa_accuracy"]
            continue
        pool = support_questions(synthetic_config, len(items) + k)
        supports = [pool[i : i + k] for i in range(len(items))]  # a different window per question
        shot_answers = answer_questions(decoder, items, False, supports)
        rows.update(accuracy_rows(shot_answers, items, headline_types, f"_{k}shot"))
    return rows, items, answers[False]


def vqa_metrics(
    decoder: Decoder, synthetic_config, num_questions: int, headline_types=HEADLINE_TYPES, shots=()
) -> dict:
    """``eval/vqa_accuracy`` (+ per type), ``eval/vqa_accuracy_blank``, and for each k in ``shots``
    ``eval/vqa_accuracy_{k}shot``: the same questions after k solved train-split examples."""
    return _scored(decoder, synthetic_config, num_questions, headline_types, shots)[0]


def predictions(decoder: Decoder, synthetic_config, num_questions: int) -> tuple[dict, list[dict]]:
    """The metrics and one prediction line per question (``evaluate --task=synthetic_vqa``)."""
    rows, items, answers = _scored(decoder, synthetic_config, num_questions, HEADLINE_TYPES, ())
    lines = [
        {
            "id": i,
            "type": item["type"],
            "question": item["question"],
            "prompt": decoder.prompt_text(fewshot_turns([], item)),
            "prediction": answer,
            "answers": [item["answer"]],
        }
        for i, (item, answer) in enumerate(zip(items, answers, strict=True))
    ]
    return rows, lines
