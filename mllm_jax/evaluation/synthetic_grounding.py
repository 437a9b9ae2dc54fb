"""Grounding and referring accuracy on the held-out built-in synthetic data, by generating answers.

- ``eval/grounding_accuracy``: share of held-out ``where is the <color> <shape> ?`` questions whose
  generated text holds a box (four location tokens, ``boxes.tokens_to_box``) with IoU >= 0.5 against
  the object's pixel box; no parseable box is a miss. ``eval/grounding_mean_iou`` averages the IoU
  (a miss counts 0) and ``eval/grounding_parsed`` is the share of answers that hold a box at all.
- ``eval/referring_accuracy``: share of held-out ``what is at <loc..>x4 ?`` questions answered with
  exactly the object's ``"<color> <shape>"`` (whitespace-normalised, nothing more).

``num_questions`` questions of each task (``data/grounding.py``, split ``heldout``) are answered by
batched greedy ``generate``; the model's tokenizer must hold the location tokens.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.data import boxes
from mllm_jax.data.grounding import heldout_items
from mllm_jax.data.interleaved import vqa_turns
from mllm_jax.errors import UsageError
from mllm_jax.evaluation import metrics
from mllm_jax.evaluation.decoder import Decoder

# four location tokens and EOS, plus one spare so a too-long answer shows up as a miss, not a hit
MAX_NEW_TOKENS = 6
TASKS = ("grounding", "referring")


def question_turns(item: dict) -> list[tuple[str, str]]:
    return vqa_turns(item)[:1]


def answer_items(decoder: Decoder, items) -> list[str]:
    """The greedy answer text to each item's image + question (location tokens kept, EOS dropped)."""
    return decoder.answer(items, question_turns, lambda it: decoder.image_spec(it["image"])[None])


def grounding_boxes(texts, items, image_size: int) -> tuple[list, list[float]]:
    """Each answer's parsed pixel box (None: no box) and its IoU with the item's box (0 for None)."""
    found = [boxes.tokens_to_box(t, image_size, image_size) for t in texts]
    ious = [0.0 if b is None else metrics.box_iou(b, it["box"]) for b, it in zip(found, items, strict=True)]
    return found, ious


def grounding_rows(texts, items, image_size: int) -> dict:
    found, ious = grounding_boxes(texts, items, image_size)
    return {
        "eval/grounding_accuracy": metrics.grounding_accuracy(found, [it["box"] for it in items]),
        "eval/grounding_mean_iou": float(np.mean(ious)),
        "eval/grounding_parsed": float(np.mean([b is not None for b in found])),
    }


def referring_correct(texts, items) -> list[bool]:
    return [" ".join(t.split()) == it["answer"] for t, it in zip(texts, items, strict=True)]


def grounding_answers(
    decoder: Decoder, synthetic_config, num_questions: int
) -> tuple[dict, dict[str, tuple[list[dict], list[str]]]]:
    """The metrics, and per task its held-out items and generated answers."""
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    vocab = decoder.tokenizer.get_vocab()
    missing = [t for t in (boxes.LOCATION_TOKENS[0], boxes.LOCATION_TOKENS[-1]) if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks the location tokens {missing} (config.model.location_tokens)")
    answers = {}
    for task in TASKS:
        items = heldout_items(synthetic_config, task, num_questions)
        answers[task] = (items, answer_items(decoder, items))
    (g_items, g_texts), (r_items, r_texts) = answers["grounding"], answers["referring"]
    rows = grounding_rows(g_texts, g_items, synthetic_config.image_size)
    rows["eval/referring_accuracy"] = float(np.mean(referring_correct(r_texts, r_items)))
    return rows, answers


def grounding_metrics(decoder: Decoder, synthetic_config, num_questions: int) -> dict:
    """``eval/grounding_accuracy``, ``eval/grounding_mean_iou``, ``eval/grounding_parsed`` and
    ``eval/referring_accuracy`` on ``num_questions`` held-out questions of each task."""
    return grounding_answers(decoder, synthetic_config, num_questions)[0]


def predictions(decoder: Decoder, synthetic_config, num_questions: int) -> tuple[dict, list[dict]]:
    """The metrics and one line per question, grounding then referring (``evaluate
    --task=synthetic_grounding``); a model without location tokens is a usage error."""
    try:
        rows, answers = grounding_answers(decoder, synthetic_config, num_questions)
    except ValueError as e:
        raise UsageError(f"synthetic_grounding: {e}") from None
    lines = []
    for kind, (items, texts) in answers.items():
        found, ious = grounding_boxes(texts, items, synthetic_config.image_size)
        for item, text, box, iou in zip(items, texts, found, ious, strict=True):
            prompt = decoder.prompt_text(question_turns(item))
            line = {"id": len(lines), "type": kind, "question": item["question"], "prompt": prompt}
            line |= {"prediction": text, "answers": [item["answer"]], "target_box": list(item["box"])}
            lines.append(line | ({"box": box, "iou": iou} if kind == "grounding" else {}))
    return rows, lines
