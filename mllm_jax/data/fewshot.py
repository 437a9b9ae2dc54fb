"""Question sets for evaluation on the built-in synthetic data: held-out queries, few-shot supports,
and k-shot prompts in exactly the format the ``interleaved`` task trains on.

Items are ``{"image": uint8[H, W, 3], "question", "answer", "type"}``. A k-shot prompt is
``fewshot_turns(supports, query)`` with images ``[s["image"] for s in supports] + [query["image"]]``,
encoded by ``templates.encode_prompt`` like any generation prompt.
"""

from __future__ import annotations

from mllm_jax.data.interleaved import vqa_turns
from mllm_jax.data.layouts import IMAGE
from mllm_jax.data.synthetic import QUESTION_TYPES, SyntheticConfig, make_example, pick_question

# Support items come from the train split far past the indices a short run reads first, so a few-shot
# score does not just replay the first training examples.
SUPPORT_OFFSET = 1_000_000


def _balanced(config: SyntheticConfig, split: str, n: int, start: int = 0) -> list[dict]:
    """``n`` deterministic items of ``split``, the question types interleaved in ``QUESTION_TYPES``
    order so any prefix is balanced too."""
    per_type: dict[str, list[dict]] = {t: [] for t in QUESTION_TYPES}
    want = {t: n // len(QUESTION_TYPES) + (i < n % len(QUESTION_TYPES)) for i, t in enumerate(QUESTION_TYPES)}
    index = start
    while any(len(per_type[t]) < want[t] for t in QUESTION_TYPES):
        if index - start > 100 * n + 1000:
            raise ValueError(f"could not find {want} {split} questions for {config}")
        ex = make_example(config, split, index)
        # One question per image so items are independent; rotate the preferred type like training.
        q = pick_question(ex["questions"], QUESTION_TYPES[index % len(QUESTION_TYPES)], index)
        if len(per_type[q["type"]]) < want[q["type"]]:
            per_type[q["type"]].append({"image": ex["image"], **q})
        index += 1
    out = []
    for k in range(max(want.values(), default=0)):
        out += [per_type[t][k] for t in QUESTION_TYPES if k < len(per_type[t])]
    return out


def heldout_questions(config: SyntheticConfig, n: int) -> list[dict]:
    """``n`` deterministic held-out VQA items (images never seen in training), types balanced."""
    return _balanced(config, "heldout", n)


def support_questions(config: SyntheticConfig, n: int) -> list[dict]:
    """``n`` deterministic VQA items from the train split to show as few-shot examples, types balanced."""
    return _balanced(config, "train", n, start=SUPPORT_OFFSET)


def fewshot_turns(support_items: list[dict], query_item: dict) -> list[tuple[str, str]]:
    """``k`` solved image-question-answer turns, then the query's image and question (ending with a user
    turn, ready for ``encode_prompt``): the ``interleaved`` training format."""
    turns = [turn for item in support_items for turn in vqa_turns(item)]
    return turns + [("user", f"{IMAGE} {query_item['question']}")]
