"""Tasks read from annotation files in the field's formats (COCO captions, VQAv2, RefCOCO): how one is
loaded, asked and scored, and the loop that asks the model.

Each example's prompt is the task's template with ``{field}`` replaced by the record's text; its tokens
and pixels are prepared by the model's HF processor conventions (``family_hooks.prepare_example``, as
``predict`` does), then answered by batched greedy decoding. The answer is the first line of the
generated text, stripped. Shape letters: B examples of a batch, N images, T text positions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from mllm_jax.errors import UsageError
from mllm_jax.evaluation import family_hooks
from mllm_jax.evaluation.options import Options
from mllm_jax.inference import generate

PLACEHOLDERS = ("question", "expression")  # every file task's template fields


def fill(template: str, record: dict, fields: Sequence[str]) -> str:
    """The prompt for ``record``: each ``{field}`` replaced (other braces are left alone)."""
    for name in fields:
        template = template.replace("{" + name + "}", record[name])
    return template


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def open_image(path: str):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"image {path!r}: not a readable image ({e})") from None


def pad_columns(arrays, cap: int | None) -> np.ndarray:
    """``[1, T_i]`` arrays -> ``[B, T]``, zero-padded (zero = masked for the Q-Former) to a bucketed T,
    at most ``cap`` (InstructBLIP's Q-Former text has only so many positions)."""
    longest = max(a.shape[1] for a in arrays)
    t = -(-longest // generate.PROMPT_BUCKET) * generate.PROMPT_BUCKET
    t = max(longest, min(t, cap)) if cap else t
    return np.concatenate([np.pad(a, ((0, 0), (0, t - a.shape[1]))) for a in arrays])


def stack_inputs(inputs: list, max_columns: int | None = None):
    """Prepared examples -> ``generate``'s prompts, pixels f32[B, N, H, W, C] (or None) and embed
    kwargs ``[B, T]`` (padded to one bucketed width, so every batch of a bucket has one shape)."""
    pixels = None if inputs[0].pixels is None else np.concatenate([x.pixels for x in inputs])
    kwargs = {
        k: pad_columns([x.embed_kwargs[k] for x in inputs], max_columns) for k in inputs[0].embed_kwargs
    }
    return [x.tokens for x in inputs], pixels, kwargs


@dataclasses.dataclass(frozen=True)
class FileTask:
    """A task read from annotation files: how to load it, ask the model, and score the answers."""

    name: str
    load: Callable  # (data files, image root, split) -> records (mllm_jax.evaluation.loaders)
    files: tuple[int, int]  # how many --data files: (min, max)
    prompt: str  # default template; "{field}" becomes the record's field
    fields: tuple[str, ...]  # the record fields the template must use
    max_new_tokens: int
    reference: Callable  # (index, record) -> the prediction line's id and references
    score: Callable  # prediction lines -> metrics
    parse: Callable | None = None  # (prediction, PIL image) -> more fields of the line (a box)

    def read(self, files: list[str], image_root: str | None, split: str | None, limit: int | None):
        """The task's records (the first ``limit``), every input problem a UsageError."""
        lo, hi = self.files
        if not lo <= len(files) <= hi:
            raise UsageError(
                f"--data: {self.name} takes {lo}..{hi} comma-separated file(s), got {len(files)}"
            )
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(files[0]))
        if not os.path.isdir(root):
            raise UsageError(f"--image_root {root!r}: no such directory")
        try:
            records = self.load(files, root, split)
        except ValueError as e:  # malformed annotation file: the message names the file and key
            raise UsageError(str(e)) from None
        records = records[:limit] if limit else records
        if not records:
            raise UsageError(
                f"--data {','.join(files)}: no examples" + (f" in split {split!r}" if split else "")
            )
        return records

    def count(self, records) -> int:
        return len(records)

    def template(self, prompt: str | None) -> str:
        """``prompt`` or the default, checked against the task's fields (before any model is loaded)."""
        template = prompt if prompt is not None else self.prompt
        for name in PLACEHOLDERS:
            token = "{" + name + "}"
            if name in self.fields and token not in template:
                raise UsageError(f"--prompt {template!r}: {self.name} needs a {token} placeholder")
            if name not in self.fields and token in template:
                raise UsageError(f"--prompt {template!r}: {token} does not apply to {self.name}")
        return template

    def run(self, pretrained, assets: str, records: list[dict], options: Options, keep_predictions=True):
        """``(metrics, prediction lines)`` of a loaded model on ``records`` (the lines are what is
        scored, so they come back whatever ``keep_predictions`` says)."""
        template = self.template(options.prompt)
        max_new = options.max_new_tokens or self.max_new_tokens
        rows = min(options.batch_size, len(records))
        columns = family_hooks.max_text_columns(pretrained)
        decoder = None
        lines = []
        for start in range(0, len(records), rows):
            chunk = records[start : start + rows]
            images = [open_image(r["image"]) for r in chunk]
            prompts = [fill(template, r, self.fields) for r in chunk]
            inputs = [
                family_hooks.prepare_example(pretrained, assets, p, im)
                for p, im in zip(prompts, images, strict=True)
            ]
            if decoder is None:  # the first example completes the config as predict does (IDEFICS)
                fields = dict(batch_size=options.batch_size, max_new_tokens=max_new, mesh=options.mesh)
                decoder = family_hooks.processor_decoder(pretrained, assets, inputs[0], **fields)
            tokens, pixels_BxNxHxWxC, kwargs = stack_inputs(inputs, columns)
            try:
                texts = decoder.decode_chunk(tokens, pixels_BxNxHxWxC, rows, kwargs)
            except ValueError as e:  # e.g. prompt + max_new_tokens longer than the model's positions
                raise UsageError(str(e)) from None
            for i, (text, record, prompt, image) in enumerate(
                zip(texts, chunk, prompts, images, strict=True)
            ):
                line = {
                    **self.reference(start + i, record),
                    "image": record["image"],
                    "prompt": prompt,
                    "generated": text,
                    "prediction": first_line(text),
                }
                lines.append(line | (self.parse(line["prediction"], image) if self.parse else {}))
            logging.info("evaluated %d/%d examples", len(lines), len(records))
        return self.score(lines), lines
