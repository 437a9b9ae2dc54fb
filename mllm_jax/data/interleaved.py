"""Interleaved image-text records: MMC4-style documents and the built-in multi-image synthetic tasks.

A document record is ``{"document": [("text", str) | ("image", image), ...]}``: every text token is
learned (``templates.encode_document``). An image is anything ``transforms.load_image`` takes, or
``{"error": reason}`` for one that is known to be unusable at the source (an unsafe path, a name the
tar sample lacks): the pipeline drops such images one by one, counting each by reason, and skips a
document only when none of its images is left.

MMC4 (``{"text_list": [sentence, ...], "image_info": [{"image_name", "matched_text_index"}, ...]}``)
puts each image right before the sentence it was matched to, in ``image_info`` order.

The synthetic ``interleaved`` task is a multi-turn conversation with one image per turn,
``USER : <image> q1 ASSISTANT : a1 </s> USER : <image> q2 ASSISTANT : a2 </s> ...``: each answer is
about the most recent image, which is what a Flamingo-style model needs to learn for few-shot prompts
(``fewshot.fewshot_turns`` builds those in this very format).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mllm_jax.data.layouts import IMAGE
from mllm_jax.data.synthetic import QUESTION_TYPES, SyntheticConfig, make_example, pick_question

Record = dict[str, Any]


def vqa_turns(item: dict) -> list[tuple[str, str]]:
    """One VQA exchange, the format of every synthetic VQA task: ``<image> question`` -> ``answer``."""
    return [("user", f"{IMAGE} {item['question']}"), ("assistant", item["answer"])]


def mmc4_document(raw: Any, resolve: Callable[[dict], Any]) -> Record:
    """One MMC4 JSON object -> a document record (or ``{"error": "bad_document"}``).

    ``resolve(image_info_entry)`` gives the image (a path, bytes, or ``{"error": reason}``).
    """
    if not isinstance(raw, dict):
        return {"error": "bad_document"}
    texts, infos = raw.get("text_list"), raw.get("image_info", [])
    if (
        not isinstance(texts, list)
        or not all(isinstance(t, str) for t in texts)
        or not isinstance(infos, list)
    ):
        return {"error": "bad_document"}
    before: list[list] = [[] for _ in texts]
    for info in infos:
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(texts):
            return {"error": "bad_document"}
        before[index].append(resolve(info))
    items: list[tuple[str, Any]] = []
    for sentence, images in zip(texts, before, strict=True):
        items += [("image", image) for image in images]
        # A literal "<image>" in web text would become an image slot without an image.
        sentence = " ".join(sentence.replace(IMAGE, " ").split())
        if sentence:
            items.append(("text", sentence))
    return {"document": items}


def _num_images(config: SyntheticConfig, index: int, max_images: int) -> int:
    rng = np.random.default_rng([config.seed, 7, index])
    return 2 + int(rng.integers(max_images - 1))


def _images(config: SyntheticConfig, split: str, index: int, max_images: int):
    """The ``index``-th record's examples: ids ``index * max_images + k`` never repeat across records."""
    for k in range(_num_images(config, index, max_images)):
        j = index * max_images + k
        yield j, make_example(config, split, j)


def interleaved_vqa(config: SyntheticConfig, split: str, index: int, max_images: int) -> Record:
    """2..``max_images`` images, each followed by one question about it and its answer."""
    images, turns = [], []
    for j, ex in _images(config, split, index, max_images):
        images.append(ex["image"])
        turns += vqa_turns(pick_question(ex["questions"], QUESTION_TYPES[j % len(QUESTION_TYPES)], j))
    return {"images": images, "turns": turns}


def interleaved_caption(config: SyntheticConfig, split: str, index: int, max_images: int) -> Record:
    """A document of 2..``max_images`` images, each followed by its caption."""
    items: list[tuple[str, Any]] = []
    for _, ex in _images(config, split, index, max_images):
        items += [("image", ex["image"]), ("text", ex["caption"])]
    return {"document": items}
