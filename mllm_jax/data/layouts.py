"""Where images go in the token sequence, per model family (``ModelSpec.layout``).

A rendered sample is a list of parts: text ``(str, learned)`` or ``None`` for an image, in reading order.
A layout turns it into ids the tokenizer never sees (image and fake tokens) plus the text left to
tokenize, exactly as the family's HF processor lays out the same prompt:

- ``inline`` (LLaVA): each image becomes ``tokens_per_image`` image tokens in place (``LlavaProcessor``).
- ``wrapped`` (IDEFICS): each image becomes ``<fake_token_around_image> <image>
  <fake_token_around_image>``, with one fake token shared between images that only spaces separate, and
  the spaces next to an image dropped (``IdeficsProcessor`` strips its text items). One image token per
  image: the model derives which image each text token attends to from them
  (``models.xattn.latest_image_mask``).
- ``prefix`` (BLIP-2): all images' ``tokens_per_image`` query tokens go in front of everything, BOS included
  (``Blip2Processor``); the text is what remains once each ``<image>`` and the whitespace after it are
  removed (unless that whitespace is all that separates two words), so ``"USER : <image> what ?"``
  reads ``"USER : what ?"``.

Video (``ModelSpec.frames_per_image`` = T > 1, a model that merges a clip's T frames into one media item):
the T ``<image>`` placeholders of a clip, in a row with only whitespace between them, become one image
slot before the family's layout runs (``collapse_clips``), so a clip gets one block (one IDEFICS image
token); the images stay T frames each in the batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax.errors import BadExample

IMAGE = "<image>"

Part = tuple[str, bool] | None  # text and whether it is learned, or None for an image
Item = tuple[str | np.ndarray, bool]  # text to tokenize, or final token ids, and whether learned


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the data pipeline needs to know about a model: its image token, the number of feature
    vectors per image, and the family's ``layout`` (a ``LAYOUTS`` key). ``ModelSpec(id, n)`` is the inline
    layout (LLaVA's)."""

    image_token_id: int
    tokens_per_image: int = 1
    layout: str = "inline"
    around_token_id: int | None = None  # wrapped: <fake_token_around_image>
    frames_per_image: int = 1  # images (video frames) per slot in the sequence: the model's frames_per_media

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "wrapped" and self.around_token_id is None:
            raise ValueError("layout 'wrapped' needs around_token_id (the <fake_token_around_image> id)")
        if self.tokens_per_image < 1:
            raise ValueError(f"tokens_per_image must be >= 1, got {self.tokens_per_image}")
        if self.frames_per_image < 1:
            raise ValueError(f"frames_per_image must be >= 1, got {self.frames_per_image}")

    @property
    def image_tokens(self) -> int:
        """Image-token ids per image in the sequence (IDEFICS: one, whatever the resampler's size)."""
        return 1 if self.layout == "wrapped" else self.tokens_per_image


def as_spec(model: ModelSpec | int, tokens_per_image: int | None = None) -> ModelSpec:
    """A ``ModelSpec``, or LLaVA's layout from the older ``(image_token_id, tokens_per_image)`` pair."""
    if isinstance(model, ModelSpec):
        if tokens_per_image is not None and tokens_per_image != model.tokens_per_image:
            raise ValueError(f"tokens_per_image={tokens_per_image} contradicts {model}")
        return model
    if tokens_per_image is None:
        raise ValueError("pass a ModelSpec, or an image token id and tokens_per_image")
    return ModelSpec(int(model), int(tokens_per_image))


def split_images(segments: list[tuple[str, bool]]) -> list[Part]:
    """``[(text, learned)]`` with ``<image>`` placeholders -> parts (images as ``None``)."""
    parts: list[Part] = []
    for text, learned in segments:
        for k, piece in enumerate(text.split(IMAGE)):
            if k:
                parts.append(None)
            parts.append((piece, learned))
    return parts


def collapse_clips(parts: list[Part], frames: int) -> list[Part]:
    """Each run of ``frames`` images (only whitespace between them) -> one image part; the whitespace
    inside a clip goes. Raises ``BadExample("clip_frames")`` when the images do not form such runs."""
    if frames == 1:
        return parts
    out: list[Part] = []
    seen = 0  # frames of the clip being read
    for part in parts:
        if part is None:
            if seen == 0:
                out.append(None)
            seen = (seen + 1) % frames
        elif not seen:
            out.append(part)
        elif part[0].strip():
            raise BadExample("clip_frames", f"text inside a clip: a clip is {frames} {IMAGE} in a row")
    if seen:
        raise BadExample("clip_frames", f"the last clip has {seen} of {frames} frames")
    return out


def _inline(parts: list[Part], spec: ModelSpec) -> tuple[np.ndarray, list[Item]]:
    block = np.full(spec.tokens_per_image, spec.image_token_id, np.int32)
    return np.zeros(0, np.int32), [(block, False) if p is None else p for p in parts]


def _wrapped(parts: list[Part], spec: ModelSpec) -> tuple[np.ndarray, list[Item]]:
    fake, image = spec.around_token_id, spec.image_token_id
    items: list[Item] = []
    last_was_image = False
    for i, part in enumerate(parts):
        if part is None:
            ids = [image, fake] if last_was_image else [fake, image, fake]
            items.append((np.asarray(ids, np.int32), False))
            last_was_image = True
            continue
        text, learned = part
        if i > 0 and parts[i - 1] is None:
            text = text.lstrip(" ")
        if i + 1 < len(parts) and parts[i + 1] is None:
            text = text.rstrip(" ")
        if text:
            items.append((text, learned))
            last_was_image = False
    return np.zeros(0, np.int32), items


def _prefix(parts: list[Part], spec: ModelSpec) -> tuple[np.ndarray, list[Item]]:
    n_images = sum(p is None for p in parts)
    items: list[Item] = []
    after_image = False
    for part in parts:
        if part is None:
            after_image = True
            continue
        text, learned = part
        if after_image and (not items or not items[-1][0] or items[-1][0][-1].isspace()):
            text = text.lstrip()  # drop the whitespace after the image unless it separates two words
        # Rejoin the text around a removed image so it is tokenized as the processor tokenizes it.
        if items and after_image and items[-1][1] == learned:
            items[-1] = (items[-1][0] + text, learned)
        else:
            items.append((text, learned))
        after_image = False
    front = np.full(n_images * spec.tokens_per_image, spec.image_token_id, np.int32)
    return front, items


# layout -> parts -> (ids before BOS, items after it)
LAYOUTS = {"inline": _inline, "wrapped": _wrapped, "prefix": _prefix}


def lay_out(parts: list[Part], spec: ModelSpec) -> tuple[np.ndarray, list[Item]]:
    return LAYOUTS[spec.layout](collapse_clips(parts, spec.frames_per_image), spec)


def truncate(
    tokens: np.ndarray, learn: np.ndarray, length: int, spec: ModelSpec
) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut a sequence to ``length`` without leaving part of an image's token block behind.

    Returns ``(tokens, learn, n_images)``: the images whose blocks survive are the first ``n_images``
    (blocks appear in image order in every layout; a block holds ``frames_per_image`` images).
    """
    tokens, learn = tokens[:length], learn[:length]
    positions = np.flatnonzero(tokens == spec.image_token_id)
    n_images, partial = divmod(len(positions), spec.image_tokens)
    if partial:
        start = positions[n_images * spec.image_tokens]
        tokens, learn = tokens[:start], learn[:start]
    return tokens, learn, n_images * spec.frames_per_image


def count_images(tokens: np.ndarray, spec: ModelSpec) -> int:
    """Images (video frames) whose blocks are in ``tokens``."""
    return int((tokens == spec.image_token_id).sum()) // spec.image_tokens * spec.frames_per_image
