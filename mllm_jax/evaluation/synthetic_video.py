"""Motion-question accuracy on held-out built-in synthetic clips (``data/video.py``), by generating answers.

``eval/motion_accuracy`` is the accuracy on ``which way does the {color} {shape} move ?`` (left /
right / up / down); ``eval/motion_accuracy/<type>`` reports every question type alone
(``direction``, ``moving_color``). ``eval/motion_accuracy_static`` asks the same questions with every
frame replaced by the clip's first frame: with the motion gone the direction is a guess, so the gap
shows that the answers come from the motion (from one frame, a shape in a corner cell could only have
gone two ways: a model that read the start cell alone would still score about 0.5).
"""

from __future__ import annotations

import numpy as np

from mllm_jax.data.video import clip_turns, heldout_clips
from mllm_jax.evaluation.decoder import Decoder
from mllm_jax.evaluation.synthetic_vqa import accuracy_rows, first_word

HEADLINE_TYPE = "direction"
MAX_NEW_TOKENS = 3


def question_turns(item: dict) -> list[tuple[str, str]]:
    return clip_turns(len(item["frames"]), item["question"])


def answer_clips(decoder: Decoder, items, static: bool) -> list[str]:
    """Greedy answers (first word) for clip ``items`` (``{"frames": uint8[T, H, W, 3], "question"}``),
    each frame its own image in frame order; ``static``: every frame is the first one."""

    def pixels_TxHxWxC(it):
        return np.stack([decoder.image_spec(it["frames"][0] if static else f) for f in it["frames"]])

    return decoder.answer(items, question_turns, pixels_TxHxWxC, first_word)


def motion_rows(answers: list[str], items, suffix: str = "") -> dict:
    """``eval/motion_accuracy{suffix}`` (direction questions) and one row per question type."""
    return accuracy_rows(answers, items, (HEADLINE_TYPE,), suffix, metric="motion_accuracy")


def _scored(decoder: Decoder, synthetic_config, num_clips: int):
    items = heldout_clips(synthetic_config, num_clips)
    answers = {static: answer_clips(decoder, items, static) for static in (False, True)}
    rows = motion_rows(answers[False], items) | motion_rows(answers[True], items, "_static")
    return rows, items, answers


def motion_metrics(decoder: Decoder, synthetic_config, num_clips: int) -> dict:
    """``eval/motion_accuracy`` (+ per type) and ``eval/motion_accuracy_static`` (+ per type) on
    ``num_clips`` held-out clips, the question types alternating."""
    return _scored(decoder, synthetic_config, num_clips)[0]


def predictions(decoder: Decoder, synthetic_config, num_clips: int) -> tuple[dict, list[dict]]:
    """The metrics and one line per clip (``evaluate --task=synthetic_video``)."""
    rows, items, answers = _scored(decoder, synthetic_config, num_clips)
    lines = [
        {
            "id": i,
            "type": item["type"],
            "question": item["question"],
            "prompt": decoder.prompt_text(question_turns(item)),
            "prediction": answers[False][i],
            "prediction_static": answers[True][i],
            "answers": [item["answer"]],
        }
        for i, item in enumerate(items)
    ]
    return rows, lines
