"""VQA accuracy on the held-out built-in synthetic questions, by generating answers.

The headline ``eval/vqa_accuracy`` averages the question types in ``HEADLINE_TYPES``; every type is
also reported alone (``eval/vqa_accuracy/<type>``). ``eval/vqa_accuracy_blank`` asks the same
questions with blank (black) images: the gap between the two shows the answers come from the image.
"""

from __future__ import annotations

import numpy as np

from mllm_jax import generate
from mllm_jax.data import pipeline, templates

HEADLINE_TYPES = ("count", "color", "shape")


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,?!").lower() if words else ""


def answer_questions(
    model,
    params,
    tokenizer,
    image_spec,
    config,
    template: str,
    items,
    blank: bool,
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers (first word of the generated text) for ``items`` with image + question."""
    answers = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [
            templates.encode_prompt(
                template,
                tokenizer,
                [("user", "<image> " + it["question"])],
                config.image_token_id,
                config.tokens_per_image,
            ).tolist()
            for it in chunk
        ]
        pixels = np.stack([image_spec(np.zeros_like(it["image"]) if blank else it["image"]) for it in chunk])
        if len(chunk) < batch_size:  # pad the batch so every chunk reuses one compilation
            prompts += [prompts[-1]] * (batch_size - len(chunk))
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(chunk), axis=0)])
        results = generate.generate(
            model,
            params,
            prompts,
            pixels[:, None],
            max_new_tokens=max_new_tokens,
            eos_ids=[tokenizer.eos_token_id],
            pad_id=pad,
        )
        answers += [
            first_word(tokenizer.decode(ids, skip_special_tokens=True)) for ids, _ in results[: len(chunk)]
        ]
    return answers


def synthetic_vqa(
    model,
    params,
    tokenizer,
    image_spec,
    config,
    template,
    synthetic_config,
    *,
    num_questions: int,
    batch_size: int = 128,
    max_new_tokens: int = 3,
    headline_types=HEADLINE_TYPES,
) -> dict:
    items = pipeline.heldout_questions(synthetic_config, num_questions)
    rows: dict[str, float] = {}
    for blank in (False, True):
        answers = answer_questions(
            model,
            params,
            tokenizer,
            image_spec,
            config,
            template,
            items,
            blank,
            min(batch_size, len(items)),
            max_new_tokens,
        )
        correct = np.array([a == it["answer"] for a, it in zip(answers, items, strict=True)])
        types = np.array([it["type"] for it in items])
        headline = np.isin(types, headline_types)
        suffix = "_blank" if blank else ""
        rows[f"eval/vqa_accuracy{suffix}"] = float(correct[headline].mean()) if headline.any() else 0.0
        for t in sorted(set(types.tolist())):
            rows[f"eval/vqa_accuracy{suffix}/{t}"] = float(correct[types == t].mean())
    return rows
