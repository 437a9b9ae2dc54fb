"""Packed sequences (``data.packing=True``): several encoded examples share one ``max_length`` row.

The pipeline encodes and pads each example as usual; the packer then concatenates consecutive examples
of the stream into rows, in order, until the next one would overflow the row's tokens or image slots
(greedy, no reordering: the stream stays the unpacked one, only cut into rows). A packed row holds:

- ``tokens``, ``targets``, ``loss_mask`` i32/f32[T]: each example's first ``n`` entries (``n`` its
  length) one after the other, then padding; an example's targets stay its own (its last position
  targets padding with loss 0, never the next example's first token), so every target token and its
  loss are exactly those of the unpacked example;
- ``attention_mask`` i32[T]: 1 on tokens of an example, 0 on padding (what the token counts read);
- ``segment_ids`` i32[T]: 1, 2, ... for the first, second, ... example of the row, 0 on padding: what
  the models read instead of the attention mask (a token attends only within its segment: the
  ``chunk_mask`` of ``models/llm.py``, splash's segment ids, IDEFICS's image mask);
- ``positions`` i32[T]: 0-based within each example (RoPE and OPT's position table restart);
- ``images`` f32[R, Y, X, C]: the examples' images in order, R = ``packed_images`` slots (zero images
  after the last). Every layout splices or attends the k-th image block of a row to its k-th image;
- ``text_tokens`` / ``text_mask`` i32[R, text_length] when the examples carry them: each image slot
  gets its own example's text (InstructBLIP's Q-Former reads the instruction of the image's sample).

The state (``get_state``) is the parent's position at the start of the next row: the example read
ahead that did not fit is read again after a restore, so a resumed stream yields exactly the same rows.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mllm_jax.data.layouts import ModelSpec, count_images

# image slots of a packed row by default: max_length over an image block's tokens, at most this many
# times max_images (the vision tower runs on every slot, so a row should not carry many empty ones)
AUTO_IMAGE_FACTOR = 4


def row_images(max_length: int, max_images: int, packed_images: int, model: ModelSpec) -> int:
    """Image slots of a packed row: ``packed_images`` (rounded up to whole clips), or (0) as many image
    blocks as ``max_length`` holds, at most ``AUTO_IMAGE_FACTOR * max_images``; never fewer than one
    example's ``max_images``."""
    if packed_images > 0:  # whole clips (a video model's media hold frames_per_image images)
        return max(-(-packed_images // model.frames_per_image) * model.frames_per_image, max_images)
    blocks = max_length // model.image_tokens * model.frames_per_image
    return max(max_images, min(blocks, AUTO_IMAGE_FACTOR * max_images))


def example_length(example: dict) -> int:
    """Tokens of an encoded (right-padded) example."""
    return int(example["attention_mask"].sum())


def pack_row(examples: list[dict], length: int, slots: int, pad_id: int, model: ModelSpec) -> dict:
    """Encoded examples (each padded to ``length``) -> one packed row (the module docstring). The
    examples must fit: their lengths sum to at most ``length``, their images to at most ``slots``."""
    first = examples[0]
    row = {
        "tokens": np.full(length, pad_id, np.int32),
        "targets": np.full(length, pad_id, np.int32),
        "loss_mask": np.zeros(length, np.float32),
        "attention_mask": np.zeros(length, np.int32),
        "segment_ids": np.zeros(length, np.int32),
        "positions": np.zeros(length, np.int32),
        "images": np.zeros((slots, *first["images"].shape[1:]), first["images"].dtype),
    }
    texts = "text_tokens" in first
    if texts:
        n_text = first["text_tokens"].shape[-1]
        row["text_tokens"] = np.zeros((slots, n_text), np.int32)  # empty slots: no image reads them
        row["text_mask"] = np.zeros((slots, n_text), np.int32)
    at, image = 0, 0
    for segment, ex in enumerate(examples, start=1):
        n = example_length(ex)
        k = count_images(ex["tokens"][:n], model)
        if at + n > length or image + k > slots:
            raise ValueError(f"examples overflow a packed row ({at + n} tokens, {image + k} images)")
        for key in ("tokens", "targets", "loss_mask", "attention_mask"):
            row[key][at : at + n] = ex[key][:n]
        row["segment_ids"][at : at + n] = segment
        row["positions"][at : at + n] = np.arange(n)
        row["images"][image : image + k] = ex["images"][:k]
        if texts:
            row["text_tokens"][image : image + k] = ex["text_tokens"]
            row["text_mask"][image : image + k] = ex["text_mask"]
        at, image = at + n, image + k
    # padding continues the last example's positions: a row of one example equals it unpacked
    last_start = at - example_length(examples[-1])
    row["positions"][at:] = np.arange(at - last_start, length - last_start)
    return row


class PackIterDataset(grain.IterDataset):
    """Encoded examples -> packed rows (the module docstring); ``slots`` image slots per row."""

    def __init__(self, parent: grain.IterDataset, length: int, slots: int, pad_id: int, model: ModelSpec):
        super().__init__(parent)
        self.length, self.slots, self.pad_id, self.model = length, slots, pad_id, model

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackIterDataset(length={self.length}, slots={self.slots})"


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: PackIterDataset):
        super().__init__(parent)
        self._ds = ds
        self._ahead: tuple[dict, Any] | None = None  # (example read ahead, parent state before it)

    def __next__(self) -> dict:
        ds = self._ds
        row: list[dict] = []
        tokens = images = 0
        while True:
            if self._ahead is not None:
                example, before = self._ahead
                self._ahead = None
            else:
                before = self._parent.get_state()
                try:
                    example = next(self._parent)
                except StopIteration:  # a finite stream: its last row
                    if not row:
                        raise
                    return pack_row(row, ds.length, ds.slots, ds.pad_id, ds.model)
            n = example_length(example)
            k = count_images(example["tokens"][:n], ds.model)
            if row and (tokens + n > ds.length or images + k > ds.slots):
                self._ahead = (example, before)
                return pack_row(row, ds.length, ds.slots, ds.pad_id, ds.model)
            row.append(example)
            tokens, images = tokens + n, images + k
            if tokens == ds.length or images == ds.slots:
                return pack_row(row, ds.length, ds.slots, ds.pad_id, ds.model)

    def get_state(self) -> dict:
        # the next row starts at the example read ahead: restore to just before it
        return {"parent": self._ahead[1] if self._ahead is not None else self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._ahead = None
