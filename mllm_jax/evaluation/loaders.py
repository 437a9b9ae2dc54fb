"""Evaluation data in the field's standard file formats, read from local files into plain dicts.

- COCO captions (``captions_val2014.json`` and Karpathy-split files of the same shape) -> one record per
  image with all its reference captions.
- VQAv2 questions + annotations (``v2_OpenEnded_mscoco_val2014_questions.json``,
  ``v2_mscoco_val2014_annotations.json``) -> one record per question with its 10 human answers.
- Referring expressions (RefCOCO / RefCOCO+ / RefCOCOg) as JSON lines, one expression per line:
  ``{"image": "COCO_train2014_000000581857.jpg", "expression": "the lady with the blue shirt",
  "box": [x, y, w, h]}`` with the box in COCO pixel ``xywh``; any other keys (``"split"``, ``"width"``,
  ``"height"``, ``"ref_id"``, ...) are passed through. The original ``refs(unc).p`` files are pickles and
  are never read here: see docs/evaluation.md for converting them once.

Image paths are resolved under ``image_dir`` (never outside it). A missing image raises
``FileNotFoundError`` naming the image and the annotation file, unless a ``skipped`` Counter is passed:
then the example is left out and counted under ``skipped["missing_image"]``. Nothing is decoded here;
records carry the image path.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

from mllm_jax.data.transforms import safe_join
from mllm_jax.errors import BadExample

# VQAv2's test-dev questions ("data_subtype": "test-dev2015") ask about images of the test2015 folder.
VQA_IMAGE_SPLITS = {"test-dev2015": "test2015"}


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _get(obj: Any, key: str, where: str, kind: type | tuple[type, ...] = object) -> Any:
    """``obj[key]``, or a one-line ValueError naming the file/record and the key."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
        raise ValueError(f"{where}: {key!r} has the wrong type ({type(obj[key]).__name__})")
    return obj[key]


def _image(image_dir: str, file_name: str, source: str, skipped: collections.Counter | None) -> str | None:
    try:
        path = safe_join(image_dir, file_name)
    except BadExample as e:
        raise ValueError(f"{source}: {e}") from None
    if os.path.isfile(path):
        return path
    if skipped is None:
        raise FileNotFoundError(f"{source}: image not found: {path} (pass skipped=Counter() to skip)")
    skipped["missing_image"] += 1
    return None


def load_coco_captions(
    annotation_file: str, image_dir: str, *, skipped: collections.Counter | None = None
) -> list[dict]:
    """COCO captions JSON -> ``[{"image_id": int, "image": path, "captions": [str, ...]}]``.

    Records follow the order of the file's ``images``; images without any caption (e.g. an image-info
    file of the test split) are left out, since there is nothing to score them against.
    """
    data = _read_json(annotation_file)
    captions: dict[int, list[str]] = collections.defaultdict(list)
    for i, ann in enumerate(_get(data, "annotations", annotation_file, list)):
        where = f"{annotation_file}: annotations[{i}]"
        captions[_get(ann, "image_id", where, int)].append(_get(ann, "caption", where, str))
    images = []
    for i, img in enumerate(_get(data, "images", annotation_file, list)):
        where = f"{annotation_file}: images[{i}]"
        images.append((_get(img, "id", where, int), _get(img, "file_name", where, str)))
    unknown = sorted(set(captions) - {image_id for image_id, _ in images})
    if unknown:
        raise ValueError(f"{annotation_file}: captions for image_id {unknown[0]} which is not in 'images'")
    records = []
    for image_id, file_name in images:
        if image_id in captions:
            path = _image(image_dir, file_name, annotation_file, skipped)
            if path is not None:
                records.append({"image_id": image_id, "image": path, "captions": captions[image_id]})
    return records


def vqa_image_name(split: str, image_id: int) -> str:
    """COCO's file name for an image of ``split`` (``"val2014"`` -> ``COCO_val2014_000000000042.jpg``)."""
    return f"COCO_{split}_{image_id:012d}.jpg"


def load_vqav2(
    questions_file: str,
    image_dir: str,
    annotations_file: str | None = None,
    *,
    split: str | None = None,
    skipped: collections.Counter | None = None,
) -> list[dict]:
    """VQAv2 questions (+ annotations) JSON -> one record per question, in the questions file's order.

    Record: ``{"question_id", "image_id", "image", "question"}`` and, with ``annotations_file``,
    ``"answers"`` (the 10 human answer strings), ``"multiple_choice_answer"``, ``"answer_type"``,
    ``"question_type"``. Image names are ``COCO_{split}_{image_id:012d}.jpg`` with ``split`` from the
    questions file's ``data_subtype`` unless given (test-dev maps to the test2015 images).
    """
    data = _read_json(questions_file)
    if split is None:
        subtype = _get(data, "data_subtype", questions_file, str)
        split = VQA_IMAGE_SPLITS.get(subtype, subtype)
    annotations: dict[int, dict] = {}
    if annotations_file is not None:
        for i, ann in enumerate(_get(_read_json(annotations_file), "annotations", annotations_file, list)):
            where = f"{annotations_file}: annotations[{i}]"
            answers = [
                _get(a, "answer", f"{where}.answers[{j}]", str)
                for j, a in enumerate(_get(ann, "answers", where, list))
            ]
            annotations[_get(ann, "question_id", where, int)] = {
                "answers": answers,
                "multiple_choice_answer": _get(ann, "multiple_choice_answer", where, str),
                "answer_type": _get(ann, "answer_type", where, str),
                "question_type": _get(ann, "question_type", where, str),
            }
    records = []
    for i, q in enumerate(_get(data, "questions", questions_file, list)):
        where = f"{questions_file}: questions[{i}]"
        qid, image_id = _get(q, "question_id", where, int), _get(q, "image_id", where, int)
        record = {"question_id": qid, "image_id": image_id, "question": _get(q, "question", where, str)}
        if annotations_file is not None:
            if qid not in annotations:
                raise ValueError(f"{annotations_file}: no annotation for question_id {qid}")
            record |= annotations[qid]
        path = _image(image_dir, vqa_image_name(split, image_id), questions_file, skipped)
        if path is not None:
            records.append({**record, "image": path})
    return records


def load_referring(
    jsonl_file: str,
    image_dir: str,
    *,
    split: str | None = None,
    skipped: collections.Counter | None = None,
) -> list[dict]:
    """Referring-expression JSON lines -> ``[{"image": path, "expression": str, "box_xyxy": [x0, y0, x1, y1],
    ...passed-through keys}]`` in file order; ``split`` keeps only lines whose ``"split"`` equals it.

    The file's COCO ``[x, y, w, h]`` box becomes pixel corners ``(x0, y0, x1, y1)``, the convention of
    ``metrics.box_iou`` and ``boxes.box_to_tokens``. Blank lines are ignored.
    """
    if not os.path.isfile(jsonl_file):
        raise FileNotFoundError(f"referring-expressions file not found: {jsonl_file}")
    records = []
    with open(jsonl_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{jsonl_file}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if split is not None and raw.get("split") != split:
                continue
            expression = _get(raw, "expression", where, str)
            box = _get(raw, "box", where, list)
            if len(box) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
                raise ValueError(f"{where}: 'box' must be 4 numbers [x, y, w, h], got {box!r}")
            x, y, w, h = (float(v) for v in box)
            if w <= 0 or h <= 0:
                raise ValueError(f"{where}: 'box' [x, y, w, h] needs w > 0 and h > 0, got {box!r}")
            path = _image(image_dir, _get(raw, "image", where, str), jsonl_file, skipped)
            if path is None:
                continue
            extra = {k: v for k, v in raw.items() if k not in ("image", "expression", "box")}
            records.append(
                {**extra, "image": path, "expression": expression, "box_xyxy": [x, y, x + w, y + h]}
            )
    return records
