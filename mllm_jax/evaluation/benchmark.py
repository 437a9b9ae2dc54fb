"""The benchmarks of the LLaVA-1.5 suite (GQA, TextVQA, ScienceQA-IMG, POPE, MME, MMBench, SEED-Bench,
VizWiz, OK-VQA): one ``Benchmark`` per task file, this module the loop they share.

A benchmark's loader reads its released files into records (malformed records and missing images are
skipped and counted; a file of the wrong layout is one ``UsageError``). Each record is asked as one or
more *items* (MMBench asks every rotation of its options): the prompt is the task's template with
``{question}`` replaced by the item's question, composed as LLaVA-1.5's evaluation composes it (context,
question, option lines). Items are answered by batched greedy decoding (the answer scored is the whole
generated text, stripped, as LLaVA's ``model_vqa_loader.py`` hands it to the official scripts), or, for
multiple-choice tasks with ``--mc=loglik``, by the option whose answer letter has the highest mean token
log-probability as the prompt's continuation (``loglik.py``).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import io
import json
import os
from collections.abc import Callable

from absl import logging
from PIL import Image, UnidentifiedImageError

from mllm_jax.errors import UsageError
from mllm_jax.evaluation import family_hooks, file_task, loglik
from mllm_jax.evaluation.options import Options

LETTERS = "ABCDEFGHIJ"
MC_MODES = ("generate", "loglik")


class Records(list):
    """A loader's records plus how many it skipped, by reason."""

    def __init__(self, records=(), skipped: collections.Counter | None = None):
        super().__init__(records)
        self.skipped = skipped if skipped is not None else collections.Counter()


def read_json(path: str):
    """A JSON file, or a one-line UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"--data {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UsageError(f"--data {path!r}: not valid JSON ({e})") from None


def read_jsonl(path: str, skipped: collections.Counter) -> list:
    """JSON lines (blank lines ignored; a line that is not JSON is skipped and counted)."""
    if not os.path.isfile(path):
        raise UsageError(f"--data {path!r}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    skipped["malformed"] += 1
    return rows


def layout_error(path: str, expected: str) -> UsageError:
    return UsageError(f"--data {path!r}: not the expected layout: {expected}")


def field(record, key: str, kind=str):
    """``record[key]`` of type ``kind``, or ValueError (the caller skips the record)."""
    if not isinstance(record, dict) or not isinstance(record.get(key), kind) or isinstance(record[key], bool):
        raise ValueError(f"missing or malformed {key!r}")
    return record[key]


def image_path(root: str, name: str, skipped: collections.Counter) -> str | None:
    """``root/name`` if it is a file (never outside ``root``), else None, counted as a missing image."""
    path = os.path.normpath(os.path.join(root, name))
    if os.path.isabs(name) or not path.startswith(os.path.normpath(root) + os.sep):
        skipped["malformed"] += 1
        return None
    if not os.path.isfile(path):
        skipped["missing_image"] += 1
        return None
    return path


def collect(rows, make: Callable, skipped: collections.Counter, where: str) -> list:
    """``make(row)`` for each row; a ValueError skips the row (counted), None drops it silently."""
    out = []
    for i, row in enumerate(rows):
        try:
            record = make(row)
        except (ValueError, KeyError, TypeError) as e:
            logging.warning("%s: record %d skipped (%s)", where, i, e)
            skipped["malformed"] += 1
            continue
        if record is not None:
            out.append(record)
    return out


def options_text(options: list[str]) -> str:
    """LLaVA-1.5's option lines: ``A. first\\nB. second``."""
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def open_item_image(item: dict):
    if "image_b64" not in item:
        return file_task.open_image(item["image"])
    try:
        with Image.open(io.BytesIO(base64.b64decode(item["image_b64"]))) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"{item['image']}: not a readable base64 image ({e})") from None


def single(record: dict) -> list[dict]:
    return [record]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark read from its released files: how to load it, ask the model and score the answers."""

    name: str
    load: Callable  # (data files, image root, split, skipped Counter) -> records
    files: tuple[int, int]  # how many --data paths: (min, max)
    prompt: str  # default template: "{question}" becomes the item's question
    max_new_tokens: int
    score: Callable  # prediction lines -> metrics
    expand: Callable = single  # record -> the items asked (MMBench: its rotations)
    submission: Callable | None = None  # lines -> (file suffix, text) in the leaderboard's format
    multiple_choice: bool = False  # items carry "letters": --mc=loglik applies
    needs_image_root: bool = True  # False: images inside the data file (MMBench)

    def read(self, files: list[str], image_root: str | None, split: str | None, limit: int | None):
        lo, hi = self.files
        if not lo <= len(files) <= hi:
            raise UsageError(
                f"--data: {self.name} takes {lo}..{hi} comma-separated path(s), got {len(files)}"
            )
        root = image_root
        if root is None:
            first = os.path.abspath(files[0])
            root = first if os.path.isdir(first) else os.path.dirname(first)
        if self.needs_image_root and not os.path.isdir(root):
            raise UsageError(f"--image_root {root!r}: no such directory")
        skipped = collections.Counter()
        records = self.load(files, root, split, skipped)
        records = records[:limit] if limit else records
        if skipped:
            logging.warning("%s: skipped %s", self.name, dict(skipped))
        if not records:
            raise UsageError(
                f"--data {','.join(files)}: no usable examples"
                + (f" in split {split!r}" if split else "")
                + (f" (skipped: {dict(skipped)})" if skipped else "")
            )
        return Records(records, skipped)

    def count(self, records) -> int:
        return len(records)

    def template(self, prompt: str | None) -> str:
        template = prompt if prompt is not None else self.prompt
        if "{question}" not in template:
            raise UsageError(f"--prompt {template!r}: {self.name} needs a {{question}} placeholder")
        return template

    def run(self, pretrained, assets: str, records, options: Options, keep_predictions=True):
        """``(metrics, prediction lines)``; metrics include ``skipped``, the records the loader left out."""
        mode = getattr(options, "mc", "generate")
        if mode != "generate" and not self.multiple_choice:
            raise UsageError(f"--mc={mode}: {self.name} is not a multiple-choice task")
        template = self.template(options.prompt)
        items = [item for record in records for item in self.expand(record)]
        rows = min(options.batch_size, len(items))
        columns = family_hooks.max_text_columns(pretrained)
        max_new = options.max_new_tokens or self.max_new_tokens
        decoder, lines = None, []
        for start in range(0, len(items), rows):
            chunk = items[start : start + rows]
            images = [open_item_image(item) for item in chunk]
            prompts = [template.replace("{question}", item["question"]) for item in chunk]
            inputs = [
                family_hooks.prepare_example(pretrained, assets, p, im)
                for p, im in zip(prompts, images, strict=True)
            ]
            if decoder is None:  # the first example completes the config as predict does (IDEFICS)
                fields = dict(batch_size=options.batch_size, max_new_tokens=max_new, mesh=options.mesh)
                decoder = family_hooks.processor_decoder(pretrained, assets, inputs[0], **fields)
            try:
                if mode == "loglik":
                    answers = self._loglik(
                        decoder, pretrained, assets, chunk, prompts, images, inputs, columns
                    )
                else:
                    tokens, pixels_BxNxHxWxC, kwargs = file_task.stack_inputs(inputs, columns)
                    texts = decoder.decode_chunk(tokens, pixels_BxNxHxWxC, rows, kwargs)
                    answers = [{"generated": t, "prediction": t.strip()} for t in texts]
            except ValueError as e:  # e.g. prompt + max_new_tokens longer than the model's positions
                raise UsageError(str(e)) from None
            for item, prompt, answer in zip(chunk, prompts, answers, strict=True):
                line = {k: v for k, v in item.items() if k not in ("question", "image_b64")}
                lines.append(line | {"prompt": prompt} | answer)
            logging.info("%s: answered %d/%d items", self.name, len(lines), len(items))
        skipped = sum(getattr(records, "skipped", {}).values())
        return self.score(lines) | {"skipped": skipped}, lines

    def _loglik(self, decoder, pretrained, assets, chunk, prompts, images, inputs, columns):
        """Each item's option letters scored as continuations of its prompt; the best one is the answer."""
        rows, spans = [], []
        for item, prompt, image, prepared in zip(chunk, prompts, images, inputs, strict=True):
            for letter in item["letters"]:
                full = family_hooks.prepare_example(pretrained, assets, f"{prompt} {letter}", image)
                rows.append(full)
                spans.append(loglik.continuation(prepared.tokens, full.tokens))
        distinct = {tuple(r.tokens[s:e]) for r, (s, e) in zip(rows, spans, strict=True)}
        if len(distinct) < max(len(item["letters"]) for item in chunk):
            logging.warning("%s: options tokenize alike (letters unknown to the tokenizer?): ties", self.name)
        tokens, pixels, kwargs = file_task.stack_inputs(rows, columns)
        scores = loglik.mean_logprobs(decoder, tokens, pixels, kwargs, spans)
        answers, k = [], 0
        for item in chunk:
            mine = scores[k : k + len(item["letters"])]
            k += len(item["letters"])
            best = max(range(len(mine)), key=lambda i: mine[i])
            answers.append({"loglik": mine, "prediction": item["letters"][best]})
        return answers
