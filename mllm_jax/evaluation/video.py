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

from mllm_jax.data import templates
from mllm_jax.data.video import clip_turns, heldout_clips
from mllm_jax.evaluation.vqa import accuracy_rows, decode_chunk, first_word

HEADLINE_TYPE = "direction"


def answer_clips(
    model,
    params,
    tokenizer,
    image_spec,
    model_spec,
    template: str,
    items,
    static: bool,
    batch_size: int,
    max_new_tokens: int,
    mesh=None,
    rules=None,
) -> list[str]:
    """Greedy answers (first word) for clip ``items`` (``{"frames": uint8[T, H, W, 3], "question"}``),
    each frame its own image in frame order; ``static``: every frame is the first one."""
    answers = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [
            templates.encode_prompt(
                template, tokenizer, clip_turns(len(it["frames"]), it["question"]), model_spec
            ).tolist()
            for it in chunk
        ]
        pixels_BxTxHxWxC = np.stack(
            [np.stack([image_spec(it["frames"][0] if static else f) for f in it["frames"]]) for it in chunk]
        )
        texts = decode_chunk(
            model, params, tokenizer, prompts, pixels_BxTxHxWxC, batch_size, max_new_tokens, mesh, rules
        )
        answers += [first_word(text) for text in texts]
    return answers


def motion_rows(answers: list[str], items, suffix: str = "") -> dict:
    """``eval/motion_accuracy{suffix}`` (direction questions) and one row per question type."""
    return accuracy_rows(answers, items, (HEADLINE_TYPE,), suffix, metric="motion_accuracy")


def synthetic_motion(
    model,
    params,
    tokenizer,
    image_spec,
    model_spec,
    template,
    synthetic_config,
    *,
    num_clips: int,
    batch_size: int = 128,
    max_new_tokens: int = 3,
    mesh=None,
    rules=None,
) -> dict:
    """``eval/motion_accuracy`` (+ per type) and ``eval/motion_accuracy_static`` (+ per type) on
    ``num_clips`` held-out clips, the question types alternating."""
    items = heldout_clips(synthetic_config, num_clips)
    batch = min(batch_size, len(items))
    rows: dict[str, float] = {}
    for static in (False, True):
        answers = answer_clips(
            model,
            params,
            tokenizer,
            image_spec,
            model_spec,
            template,
            items,
            static,
            batch,
            max_new_tokens,
            mesh,
            rules,
        )
        rows.update(motion_rows(answers, items, "_static" if static else ""))
    return rows
