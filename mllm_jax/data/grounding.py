"""Grounding and referring on the built-in synthetic data: boxes as PaliGemma location tokens.

Both tasks ask about one object of a ``synthetic.make_example`` image, its box written as four
location tokens ``<locY0><locX0><locY1><locX1>`` (``tasks/boxes.py``: 1024 bins per coordinate,
PaliGemma's y-first order) from the object's pixel box:

- ``grounding`` (box in the output): ``<image> where is the red circle ?`` -> ``<loc..><loc..><loc..><loc..>``
- ``referring`` (box in the prompt): ``<image> what is at <loc..><loc..><loc..><loc..> ?`` -> ``red circle``

Objects are named by their (color, shape) pair, unique within an image by construction. An item is a
pure function of ``(config, split, index)``: the image is ``make_example(config, split, index)``'s and
the object is drawn from a seed of its own, so held-out items (split ``heldout``) are never training
images. The model's tokenizer must hold the location tokens (``config.model.location_tokens=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mllm_jax.data.boxes import box_to_tokens
from mllm_jax.data.interleaved import vqa_turns
from mllm_jax.data.synthetic import (
    GROUNDING_QUESTION,
    REFERRING_QUESTION,
    SPLITS,
    SyntheticConfig,
    make_example,
)

Record = dict[str, Any]
# a salt per task, so the two tasks ask about different objects of the same image
TASK_SALTS = {"grounding": 11, "referring": 12}


def _pick(config: SyntheticConfig, split: str, index: int, task: str) -> tuple[dict, dict]:
    ex = make_example(config, split, index)
    rng = np.random.default_rng([config.seed, TASK_SALTS[task], SPLITS.index(split), index])
    return ex, ex["objects"][int(rng.integers(len(ex["objects"])))]


def _item(ex: dict, obj: dict, config: SyntheticConfig, task: str) -> dict:
    size = config.image_size
    return {
        "image": ex["image"],
        "type": task,
        "name": f"{obj['color']} {obj['shape']}",
        "box": tuple(float(v) for v in obj["box"]),  # pixel (x0, y0, x1, y1), x1 / y1 exclusive
        "tokens": box_to_tokens(obj["box"], size, size),
    }


def grounding_item(config: SyntheticConfig, split: str, index: int) -> dict:
    """``{"image", "type", "question", "answer", "name", "box", "tokens"}``: where is the named object."""
    ex, obj = _pick(config, split, index, "grounding")
    item = _item(ex, obj, config, "grounding")
    return item | {"question": GROUNDING_QUESTION.format(name=item["name"]), "answer": item["tokens"]}


def referring_item(config: SyntheticConfig, split: str, index: int) -> dict:
    """Like ``grounding_item``, the other way round: the box is in the question, the name answers it."""
    ex, obj = _pick(config, split, index, "referring")
    item = _item(ex, obj, config, "referring")
    return item | {"question": REFERRING_QUESTION.format(box=item["tokens"]), "answer": item["name"]}


ITEMS = {"grounding": grounding_item, "referring": referring_item}


def _record(item: dict) -> Record:
    return {"images": [item["image"]], "turns": vqa_turns(item)}


def grounding_record(config: SyntheticConfig, split: str, index: int, max_images: int) -> Record:
    return _record(grounding_item(config, split, index))


def referring_record(config: SyntheticConfig, split: str, index: int, max_images: int) -> Record:
    return _record(referring_item(config, split, index))


def heldout_items(config: SyntheticConfig, task: str, n: int) -> list[dict]:
    """The first ``n`` held-out items of ``task`` (``"grounding"`` | ``"referring"``), deterministic."""
    if task not in ITEMS:
        raise ValueError(f"task must be one of {tuple(ITEMS)}, got {task!r}")
    return [ITEMS[task](config, "heldout", i) for i in range(n)]
