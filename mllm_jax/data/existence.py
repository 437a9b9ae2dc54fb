"""Object-existence questions on the built-in scenes ("is there a red circle in the image ?" -> yes / no):
POPE's three kinds of negatives, the ``existence`` training task, and the synthetic ``preference`` task
(DPO pairs whose rejected answer names a colour or shape that is not in the image).

A scene's objects are (colour, shape) pairs; the negatives of a question are pairs absent from it:

- ``random``: any absent pair;
- ``popular``: the absent pair seen most often in the train split's scenes (POPE: the most frequent
  objects of the dataset);
- ``adversarial``: an absent pair that shares its colour or its shape with an object in the image (POPE
  takes the objects that co-occur most with the ground truth; here the nearest confusion is binding a
  colour that is there to a shape that is there, the hallucination the preference task targets).

Items are ``{"image": uint8[H, W, 3], "question", "answer": "yes" | "no", "type": negative kind}``; the
``index``-th item of a split is a pure function of its arguments, and the positives (even indices) do
not depend on the kind, so the three POPE settings ask about the same images, as POPE does.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mllm_jax.data.interleaved import vqa_turns
from mllm_jax.data.layouts import IMAGE
from mllm_jax.data.synthetic import (
    EXISTENCE_QUESTION,
    SyntheticConfig,
    caption,
    make_example,
    pick_question,
)

NEGATIVE_TYPES = ("random", "popular", "adversarial")
POPULAR_SCENES = 2_000  # train scenes counted for the "popular" ranking
# what the synthetic preference task's i-th pair asks (i % 4)
PREFERENCE_KINDS = ("existence", "color", "shape", "caption")


def _pairs(config: SyntheticConfig) -> list[tuple[str, str]]:
    return [(c, s) for c in config.colors for s in config.shapes]


def absent_pairs(config: SyntheticConfig, objects: list[dict]) -> list[tuple[str, str]]:
    there = {(o["color"], o["shape"]) for o in objects}
    return [p for p in _pairs(config) if p not in there]


@functools.lru_cache(maxsize=8)
def popularity(config: SyntheticConfig) -> dict[tuple[str, str], int]:
    """How many of the first ``POPULAR_SCENES`` train scenes hold each (colour, shape) pair."""
    counts = dict.fromkeys(_pairs(config), 0)
    for i in range(POPULAR_SCENES):
        for o in make_example(config, "train", i)["objects"]:
            counts[(o["color"], o["shape"])] += 1
    return counts


def negative(config: SyntheticConfig, objects: list[dict], kind: str, rng: np.random.Generator):
    """An absent (colour, shape) pair of ``kind`` (NEGATIVE_TYPES), or None when every pair is there."""
    absent = absent_pairs(config, objects)
    if not absent:
        return None
    if kind == "popular":
        counts = popularity(config)
        return max(absent, key=lambda p: counts[p])  # ties: the first in config order
    if kind == "adversarial":
        colors, shapes = {o["color"] for o in objects}, {o["shape"] for o in objects}
        near = [p for p in absent if p[0] in colors or p[1] in shapes]
        absent = near or absent
    elif kind != "random":
        raise ValueError(f"negative kind must be one of {NEGATIVE_TYPES}, got {kind!r}")
    return absent[int(rng.integers(len(absent)))]


def _question(pair: tuple[str, str]) -> str:
    return EXISTENCE_QUESTION.format(name=f"{pair[0]} {pair[1]}")


def existence_item(config: SyntheticConfig, split: str, index: int, kind: str = "random") -> dict:
    """The ``index``-th yes / no question of ``split``: even indices ask about an object in the image
    (yes), odd ones about an absent pair of ``kind`` (no)."""
    ex = make_example(config, split, index)
    objects = ex["objects"]
    rng = np.random.default_rng([config.seed, 17, index])
    o = objects[int(rng.integers(len(objects)))]  # drawn first: the positive does not depend on kind
    pair = negative(config, objects, kind, rng) if index % 2 else None
    answer = "no" if pair is not None else "yes"
    return {
        "image": ex["image"],
        "question": _question(pair or (o["color"], o["shape"])),
        "answer": answer,
        "type": kind,
    }


def pope_items(config: SyntheticConfig, n: int) -> list[dict]:
    """``n`` held-out POPE questions, the negative kinds in turn (about n/3 each, half of them yes)."""
    per_kind = [n // len(NEGATIVE_TYPES) + (i < n % len(NEGATIVE_TYPES)) for i in range(len(NEGATIVE_TYPES))]
    items = [
        [existence_item(config, "heldout", i, kind) for i in range(count)]
        for kind, count in zip(NEGATIVE_TYPES, per_kind, strict=True)
    ]
    return [
        kind_items[i] for i in range(max(per_kind, default=0)) for kind_items in items if i < len(kind_items)
    ]


def existence_record(config: SyntheticConfig, split: str, index: int, max_images: int) -> dict:
    """Synthetic task ``existence``: one yes / no question with a random negative (instruction data)."""
    item = existence_item(config, split, index, "random")
    return {"images": [item["image"]], "turns": vqa_turns(item)}


def _swap(objects: list[dict], config: SyntheticConfig, rng: np.random.Generator) -> list[dict] | None:
    """The objects with one colour (or shape) replaced by one absent from the image: a hallucinated
    caption."""
    colors = [c for c in config.colors if c not in {o["color"] for o in objects}]
    shapes = [s for s in config.shapes if s not in {o["shape"] for o in objects}]
    if not colors and not shapes:
        return None
    k = int(rng.integers(len(objects)))
    key, values = ("color", colors) if colors and (not shapes or rng.integers(2)) else ("shape", shapes)
    wrong = [dict(o) for o in objects]
    wrong[k][key] = values[int(rng.integers(len(values)))]
    return wrong


def preference_record(config: SyntheticConfig, split: str, index: int, max_images: int) -> dict:
    """Synthetic task ``preference``: ``{"images", "turns" (the prompt), "chosen", "rejected"}``. By
    ``index % 4``: an existence question (adversarial negatives; rejected: the wrong yes / no), a colour
    or shape question (rejected: a colour / shape absent from the image), or a caption (rejected: the
    caption with one colour or shape swapped for an absent one). A kind the scene cannot pose falls
    back to the existence question."""
    ex = make_example(config, split, index)
    objects = ex["objects"]
    rng = np.random.default_rng([config.seed, 29, index])
    kind = PREFERENCE_KINDS[index % len(PREFERENCE_KINDS)]
    pair: Any = None
    if kind in ("color", "shape"):
        q = pick_question(ex["questions"], kind, index)
        absent = [v for v in getattr(config, kind + "s") if v not in {o[kind] for o in objects}]
        if q["type"] == kind and absent:
            wrong = absent[int(rng.integers(len(absent)))]
            pair = (ex["image"], [("user", f"{IMAGE} {q['question']}")], q["answer"], wrong)
    elif kind == "caption" and (wrong := _swap(objects, config, rng)) is not None:
        pair = (ex["image"], [("user", IMAGE)], caption(objects), caption(wrong))
    if pair is None:
        item = existence_item(config, split, index // len(PREFERENCE_KINDS), "adversarial")
        flipped = "yes" if item["answer"] == "no" else "no"
        pair = (item["image"], [("user", f"{IMAGE} {item['question']}")], item["answer"], flipped)
    image, turns, chosen, rejected = pair
    return {"images": [image], "turns": turns, "chosen": chosen, "rejected": rejected}
