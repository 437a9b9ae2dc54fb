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

from mllm_jax.data import boxes, templates
from mllm_jax.data.grounding import heldout_items
from mllm_jax.data.interleaved import vqa_turns
from mllm_jax.evaluation import metrics
from mllm_jax.evaluation.vqa import decode_chunk

# four location tokens and EOS, plus one spare so a too-long answer shows up as a miss, not a hit
MAX_NEW_TOKENS = 6


def generate_answers(
    model,
    params,
    tokenizer,
    image_spec,
    model_spec,
    template: str,
    items,
    batch_size: int,
    max_new_tokens: int,
    mesh=None,
    rules=None,
) -> list[str]:
    """The greedy answer text to each item's image + question (location tokens kept, EOS dropped);
    decoded sharded over ``mesh`` when given (``generate.generate``)."""
    texts = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [
            templates.encode_prompt(template, tokenizer, vqa_turns(it)[:1], model_spec).tolist()
            for it in chunk
        ]
        pixels = np.stack([image_spec(it["image"])[None] for it in chunk])
        chunk_texts = decode_chunk(
            model, params, tokenizer, prompts, pixels, batch_size, max_new_tokens, mesh, rules
        )
        texts += [text.strip() for text in chunk_texts]
    return texts


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


def grounding_predictions(
    model,
    params,
    tokenizer,
    image_spec,
    model_spec,
    template,
    synthetic_config,
    *,
    num_questions: int,
    batch_size: int = 128,
    max_new_tokens: int = MAX_NEW_TOKENS,
    mesh=None,
    rules=None,
) -> tuple[dict, dict[str, tuple[list[dict], list[str]]]]:
    """The metrics, and per task its held-out items and generated answers."""
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    missing = [
        t for t in (boxes.LOCATION_TOKENS[0], boxes.LOCATION_TOKENS[-1]) if t not in tokenizer.get_vocab()
    ]
    if missing:
        raise ValueError(f"the tokenizer lacks the location tokens {missing} (config.model.location_tokens)")
    batch = min(batch_size, num_questions)
    args = (model, params, tokenizer, image_spec, model_spec, template)
    answers = {}
    for task in ("grounding", "referring"):
        items = heldout_items(synthetic_config, task, num_questions)
        answers[task] = (items, generate_answers(*args, items, batch, max_new_tokens, mesh, rules))
    (g_items, g_texts), (r_items, r_texts) = answers["grounding"], answers["referring"]
    rows = grounding_rows(g_texts, g_items, synthetic_config.image_size)
    rows["eval/referring_accuracy"] = float(np.mean(referring_correct(r_texts, r_items)))
    return rows, answers


def synthetic_grounding(
    model,
    params,
    tokenizer,
    image_spec,
    model_spec,
    template,
    synthetic_config,
    num_questions: int,
    batch_size: int = 128,
    max_new_tokens: int = MAX_NEW_TOKENS,
    mesh=None,
    rules=None,
) -> dict:
    """``eval/grounding_accuracy``, ``eval/grounding_mean_iou``, ``eval/grounding_parsed`` and
    ``eval/referring_accuracy`` on ``num_questions`` held-out questions of each task."""
    rows, _ = grounding_predictions(
        model,
        params,
        tokenizer,
        image_spec,
        model_spec,
        template,
        synthetic_config,
        num_questions=num_questions,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        mesh=mesh,
        rules=rules,
    )
    return rows
