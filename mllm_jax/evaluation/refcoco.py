"""Referring expressions (RefCOCO / RefCOCO+ / RefCOCOg as JSON lines) -> grounding accuracy at
IoU >= 0.5 of the box the model writes as PaliGemma location tokens (no parseable box = a miss)."""

from __future__ import annotations

import numpy as np

from mllm_jax.data import boxes
from mllm_jax.evaluation import loaders, metrics
from mllm_jax.evaluation.file_task import FileTask


def _load(files, image_root, split):
    return loaders.load_referring(files[0], image_root, split=split)


def _reference(index, r):
    # one line per expression; RefCOCO's ref_id repeats over a ref's sentences, so the id is the index
    passed = {k: r[k] for k in ("ref_id", "split") if k in r}
    return {"id": index, **passed, "expression": r["expression"], "target_box": r["box_xyxy"]}


def parse_box(prediction: str, image) -> dict:
    """The answer's box in the image's pixels (None: no four location tokens) and the image size."""
    width, height = image.size
    return {"box": boxes.tokens_to_box(prediction, width, height), "width": width, "height": height}


def score(lines) -> dict:
    found = [line["box"] for line in lines]
    return {
        "grounding_accuracy": metrics.grounding_accuracy(found, [line["target_box"] for line in lines]),
        "parsed_boxes": float(np.mean([b is not None for b in found])),
    }


# PaliGemma's "detect" prompt
TASK = FileTask(
    "refcoco",
    _load,
    (1, 1),
    "USER: <image>\ndetect {expression} ASSISTANT:",
    ("expression",),
    12,
    _reference,
    score,
    parse_box,
)
