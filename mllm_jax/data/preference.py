"""Preference pairs for a DPO stage (``config.stages.<name>.loss="dpo"``): the ``preference_json`` source
and how a pair becomes one example.

``preference_json`` reads a JSON list or JSONL file of records ``{"image": "path/relative/to/image_root"
(optional), "prompt": str, "chosen": str, "rejected": str}`` (the layout LLaVA-RLHF's and RLHF-V's
preference sets flatten to; ``"id"`` is kept when present). The prompt is the user's turn; an image record
gets its ``<image>`` placeholder first, as LLaVA's loader puts it. A malformed record becomes an error
record (``bad_preference``), skipped and counted like every bad example (``data/skipped/<reason>``).

A pair record ``{"images", "turns", "chosen", "rejected"}`` (this source's, or the synthetic
``preference`` task's, ``existence.py``) is encoded as two conversations, the prompt's turns followed by
each answer, stacked: ``tokens``, ``targets``, ``loss_mask``, ``attention_mask`` ``[2, T]`` (row 0 chosen,
row 1 rejected) and the images once, ``[I, H, W, C]``; a batch is then ``[B, 2, T]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mllm_jax.data.layouts import IMAGE
from mllm_jax.data.sources import JsonRecords
from mllm_jax.data.transforms import safe_join
from mllm_jax.errors import BadExample

PAIR_KEYS = ("chosen", "rejected")


def preference_record(raw: Any, image_root: str) -> dict:
    """One JSON preference record -> a pair record (or an error record)."""
    if not isinstance(raw, dict):
        return {"error": "bad_preference", "detail": "not a JSON object"}
    texts = {k: raw.get(k) for k in ("prompt", *PAIR_KEYS)}
    bad = [k for k, v in texts.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        return {"error": "bad_preference", "detail": f"{bad[0]} is missing or not a non-empty string"}
    if texts["chosen"].strip() == texts["rejected"].strip():
        return {"error": "bad_preference", "detail": "chosen and rejected are the same"}
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        return {"error": "bad_preference", "detail": "image must be a path"}
    prompt = texts["prompt"].replace(IMAGE, "").strip()
    try:
        images = [] if image is None else [safe_join(image_root, image)]
    except BadExample as e:
        return {"error": e.reason, "detail": str(e)}
    user = f"{IMAGE}\n{prompt}" if images else prompt
    return {
        "images": images,
        "turns": [("user", user)],
        "chosen": texts["chosen"].strip(),
        "rejected": texts["rejected"].strip(),
        "id": str(raw.get("id", "")),
    }


class PreferenceJsonSource:
    """Preference pairs from a JSON list or JSONL file (see the module docstring)."""

    def __init__(self, path: str, image_root: str = ""):
        self.path, self.image_root = path, image_root
        self._records = JsonRecords(path)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        raw = self._records.raw(index)
        record = {"error": "bad_json"} if raw is None else preference_record(raw, self.image_root)
        return record | {"where": self._records.where(index)}


def is_pair(record: dict) -> bool:
    return "chosen" in record


def encode_pair(encode: Callable[[dict], dict], record: dict) -> dict:
    """A pair record -> one example of stacked chosen / rejected rows; ``encode`` is the pipeline's
    ``Encoder.encode`` of one conversation (so its checks, truncation and bad-example reasons apply)."""
    turns = [tuple(t) for t in record.get("turns") or ()]
    if not turns or turns[-1][0] != "user":
        raise BadExample("bad_preference", "a pair's prompt must end with the user's turn")
    images = record.get("images", [])
    sides = [encode({"images": images, "turns": [*turns, ("assistant", record[k])]}) for k in PAIR_KEYS]
    if np.array_equal(sides[0]["tokens"], sides[1]["tokens"]):
        raise BadExample("identical_pair", "chosen and rejected are the same after truncation")
    out = {k: np.stack([sides[0][k], sides[1][k]]) for k in sides[0] if k != "images"}
    out["images"] = sides[0]["images"]
    return out
