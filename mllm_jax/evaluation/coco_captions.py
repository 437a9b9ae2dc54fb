"""COCO captions (``captions_val2014.json`` or a Karpathy split of the same shape) -> CIDEr (CIDEr-D)
and BLEU-1..4 of the model's one-sentence captions (``metrics.caption_scores``)."""

from __future__ import annotations

from mllm_jax.errors import UsageError
from mllm_jax.evaluation import loaders, metrics
from mllm_jax.evaluation.file_task import FileTask


def _load(files, image_root, split):
    if split is not None:
        raise UsageError("--split: coco_captions evaluates the whole annotation file")
    return loaders.load_coco_captions(files[0], image_root)


def _reference(index, r):
    return {"id": r["image_id"], "references": r["captions"]}


def _score(lines) -> dict:
    refs = {line["id"]: line["references"] for line in lines}
    return metrics.caption_scores(refs, {line["id"]: line["prediction"] for line in lines})


# LLaVA-1.5's captioning prompt
TASK = FileTask(
    "coco_captions",
    _load,
    (1, 1),
    "USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT:",
    (),
    32,
    _reference,
    _score,
)
