"""VQA accuracy on the held-out built-in synthetic questions, by generating answers.

The headline ``eval/vqa_accuracy`` averages the question types in ``HEADLINE_TYPES``; every type is
also reported alone (``eval/vqa_accuracy/<type>``). Few-shot accuracy (``eval/vqa_accuracy_{k}shot``)
puts k solved examples from the train split, each with its own image, before the question.
``eval/vqa_accuracy_blank`` asks the same questions with blank (black) images: the gap between the
two shows the answers come from the image.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.data import templates
from mllm_jax.data.fewshot import fewshot_turns, heldout_questions, support_questions
from mllm_jax.inference import generate

HEADLINE_TYPES = ("count", "color", "shape")


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,?!").lower() if words else ""


def decode_chunk(
    model, params, tokenizer, prompts, pixels, batch_size: int, max_new_tokens: int, mesh=None, rules=None
) -> list[str]:
    """Greedy texts (special tokens dropped) for one chunk of at most ``batch_size`` prompts and their
    pixels. A short chunk is padded with copies of its last row so every chunk reuses one compilation;
    ``mesh``, ``rules``: decode sharded as training is (``generate.generate``)."""
    n = len(prompts)
    if n < batch_size:
        prompts = prompts + [prompts[-1]] * (batch_size - n)
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - n, axis=0)])
    results = generate.generate(
        model,
        params,
        prompts,
        pixels,
        max_new_tokens=max_new_tokens,
        eos_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        mesh=mesh,
        rules=rules,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in results[:n]]


def answer_questions(
    model,
    params,
    tokenizer,
    image_spec,
    model_spec,
    template: str,
    items,
    blank: bool,
    batch_size: int,
    max_new_tokens: int,
    supports=None,
    mesh=None,
    rules=None,
) -> list[str]:
    """Greedy answers (first word of the generated text) for ``items`` with image + question;
    ``supports[i]`` (optional): the solved examples put before item ``i`` (few-shot). ``mesh``, ``rules``:
    decode sharded as training is (``generate.generate``)."""
    answers = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        shots = [supports[start + j] if supports else [] for j in range(len(chunk))]
        prompts = [
            templates.encode_prompt(template, tokenizer, fewshot_turns(sup, it), model_spec).tolist()
            for sup, it in zip(shots, chunk, strict=True)
        ]
        pixels = np.stack(
            [
                np.stack(
                    [image_spec(s["image"]) for s in sup]
                    + [image_spec(np.zeros_like(it["image"]) if blank else it["image"])]
                )
                for sup, it in zip(shots, chunk, strict=True)
            ]
        )
        texts = decode_chunk(
            model, params, tokenizer, prompts, pixels, batch_size, max_new_tokens, mesh, rules
        )
        answers += [first_word(text) for text in texts]
    return answers


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


def synthetic_vqa(
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
    max_new_tokens: int = 3,
    headline_types=HEADLINE_TYPES,
    shots=(),
    mesh=None,
    rules=None,
) -> dict:
    """``eval/vqa_accuracy`` (+ per type), ``eval/vqa_accuracy_blank``, and for each k in ``shots``
    ``eval/vqa_accuracy_{k}shot``: the same questions after k solved train-split examples."""
    items = heldout_questions(synthetic_config, num_questions)
    batch = min(batch_size, len(items))
    sharded = dict(mesh=mesh, rules=rules)
    if mesh is not None:  # placed once, not per batch
        params = generate.place_params(model, params, mesh, rules)
    rows: dict[str, float] = {}
    for blank in (False, True):
        answers = answer_questions(
            model,
            params,
            tokenizer,
            image_spec,
            model_spec,
            template,
            items,
            blank,
            batch,
            max_new_tokens,
            **sharded,
        )
        rows.update(accuracy_rows(answers, items, headline_types, "_blank" if blank else ""))
    for k in shots:
        if k == 0:
            rows["eval/vqa_accuracy_0shot"] = rows["eval/vqa_accuracy"]
            continue
        pool = support_questions(synthetic_config, len(items) + k)
        supports = [pool[i : i + k] for i in range(len(items))]  # a different window per question
        answers = answer_questions(
            model,
            params,
            tokenizer,
            image_spec,
            model_spec,
            template,
            items,
            False,
            batch,
            max_new_tokens,
            supports,
            **sharded,
        )
        rows.update(accuracy_rows(answers, items, headline_types, f"_{k}shot"))
    return rows
