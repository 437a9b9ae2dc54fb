"""Boxes as location tokens in text, as PaliGemma writes them: ``<loc0000>`` .. ``<loc1023>``.

A box is four tokens in PaliGemma's order ``y0 x0 y1 x1``, each coordinate divided by the image height
or width and quantised to ``round(v * 1023)`` (1024 bins, clipped to [0, 1023]); decoding maps bin ``k``
back to ``k / 1023``. Order and quantisation follow big_vision, PaliGemma's reference code:
``big_vision/pp/proj/paligemma/segmentation.py`` (``refcoco_mask2str``: ``round(bbox * 1023)`` over the
``(ymin, xmin, ymax, xmax)`` box) and ``big_vision/evaluators/proj/paligemma/transfers/segmentation.py``
(``y1, x1, y2, x2 = tokens[:4] / 1023``); see also the ``detect {object}`` task syntax at
https://ai.google.dev/gemma/docs/paligemma/prompt-system-instructions.

The same tokens serve both directions: boxes in the output (grounding: "where is the red circle?" ->
``<loc..>x4``) and regions in the prompt (referring: "what is in <loc..>x4?"). Boxes in this library are
pixel ``(x0, y0, x1, y1)``; only the token string uses PaliGemma's y-first order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from tokenizers import AddedToken

NUM_BINS = 1024
LOCATION_TOKENS = tuple(f"<loc{i:04d}>" for i in range(NUM_BINS))
# Four location tokens in a row; decoders may put spaces between added tokens, so those are allowed.
_BOX_PATTERN = re.compile(r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>")


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image width and height must be positive, got {width}x{height}")


def box_to_tokens(box_xyxy: Sequence[float], width: float, height: float) -> str:
    """Pixel box ``(x0, y0, x1, y1)`` in a ``width`` x ``height`` image -> ``"<locY0><locX0><locY1><locX1>"``.

    Coordinates outside the image are clipped to its border.
    """
    _check_size(width, height)
    if len(box_xyxy) != 4 or not all(math.isfinite(float(v)) for v in box_xyxy):
        raise ValueError(f"a box must be 4 finite numbers (x0, y0, x1, y1), got {box_xyxy!r}")
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box (x0, y0, x1, y1) must have x0 <= x1 and y0 <= y1, got {box_xyxy!r}")
    # Python's round is half-to-even, like tf.round in big_vision.
    bins = [
        min(NUM_BINS - 1, max(0, round(v * (NUM_BINS - 1))))
        for v in (y0 / height, x0 / width, y1 / height, x1 / width)
    ]
    return "".join(LOCATION_TOKENS[b] for b in bins)


def tokens_to_box(text: str, width: float, height: float) -> list[float] | None:
    """The first run of four location tokens in ``text`` -> pixel box ``[x0, y0, x1, y1]``.

    Text around (and spaces between) the tokens is ignored. Returns None when there is no run of four
    tokens, a bin is out of range, or the box is inverted (y1 < y0 or x1 < x0): a model output that
    names no usable box, which grounding accuracy counts as a miss.
    """
    _check_size(width, height)
    match = _BOX_PATTERN.search(text)
    if match is None:
        return None
    y0, x0, y1, x1 = (int(g) for g in match.groups())
    if max(y0, x0, y1, x1) >= NUM_BINS or y1 < y0 or x1 < x0:
        return None
    scale = NUM_BINS - 1
    return [x0 / scale * width, y0 / scale * height, x1 / scale * width, y1 / scale * height]


def add_location_tokens(tokenizer) -> int:
    """Adds ``<loc0000>`` .. ``<loc1023>`` to a HF tokenizer; returns how many were new (0 if present).

    They are added as whole, unnormalised tokens (never split, never lowercased) but not as *special*
    tokens, so ``decode(..., skip_special_tokens=True)`` keeps them, as PaliGemma's tokenizer does. New
    tokens get consecutive ids in bin order; the caller resizes the model's embeddings (and LM head) to
    ``len(tokenizer)`` and saves the tokenizer with the checkpoint.
    """
    return tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in LOCATION_TOKENS])
