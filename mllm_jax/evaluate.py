r"""Evaluate a model on a task with the field's metrics.

    python -m mllm_jax.evaluate --model=PATH --task=NAME --data=FILE[,FILE] [--image_root=DIR] \
        [--split=S] [--batch_size=16] [--max_new_tokens=N] [--prompt=TEMPLATE] [--limit=N] \
        [--predictions=OUT.jsonl] [--mesh=data=-1,fsdp=1,tensor=1]

PATH is a HF directory or one of our checkpoints / training workdirs, loaded as ``predict`` loads it;
each example's tokens and pixels are prepared by ``predict.prepare_inputs`` (the model's HF processor
conventions), then answered by batched greedy ``generate``. Tasks (``TASKS``):

- ``coco_captions``: ``--data=captions_val2014.json`` -> CIDEr (CIDEr-D) and BLEU-1..4.
- ``vqav2``: ``--data=QUESTIONS.json[,ANNOTATIONS.json]`` -> VQAv2 accuracy (also per answer type) and
  exact match; without annotations (test-dev) only the predictions are written.
- ``refcoco``: ``--data=REFS.jsonl`` -> grounding accuracy at IoU >= 0.5 of the box the model writes as
  PaliGemma location tokens (no parseable box = a miss).
- ``synthetic_vqa``: the built-in held-out synthetic questions, for our checkpoints trained on the
  built-in data; ``--data`` is optional (a JSON file of ``SyntheticConfig`` fields, e.g. the run's
  ``config.synthetic``), ``--prompt`` names a conversation template (default ``tiny``), ``--limit``
  is the number of questions (default 256). Metric keys are the ones training logs.
- ``synthetic_grounding``: the same for boxes as location tokens (``config.model.location_tokens``):
  ``--limit`` held-out grounding and as many referring questions -> ``eval/grounding_accuracy``
  (IoU >= 0.5), ``eval/grounding_mean_iou``, ``eval/grounding_parsed``, ``eval/referring_accuracy``.
- ``synthetic_video``: ``--limit`` held-out clips (``data/video.py``), one motion question each ->
  ``eval/motion_accuracy`` and ``eval/motion_accuracy_static`` (every frame replaced by the first).

``--prompt`` is a template with the model's image placeholder and ``{question}`` (vqav2) or
``{expression}`` (refcoco); the answer is the first line of the generated text, stripped. One JSON
object of metrics goes to stdout, logs to stderr; ``--predictions`` writes one JSON line per example.
Bad input is reported in one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags, logging

from mllm_jax import predict
from mllm_jax.errors import UsageError

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program, so training can import ``evaluate``."""
    flags.DEFINE_string("model", None, "HF model directory or mllm_jax checkpoint / training workdir.")
    flags.DEFINE_string("task", None, f"One of {TASK_NAMES}.")
    flags.DEFINE_string("data", "", "The task's data file(s), comma-separated (see docs/evaluation.md).")
    flags.DEFINE_string("image_root", None, "Image directory (default: the first data file's directory).")
    flags.DEFINE_string("split", None, "vqav2: the image split; refcoco: keep only this 'split'.")
    flags.DEFINE_integer("batch_size", 16, "Examples per generate call (the last batch is padded).")
    flags.DEFINE_integer("max_new_tokens", None, "Maximum generated tokens (default: the task's).")
    flags.DEFINE_string(
        "prompt", None, "Prompt template (default: the task's); synthetic_vqa: a template name."
    )
    flags.DEFINE_integer("limit", None, "Evaluate the first N examples only (synthetic_vqa: N questions).")
    flags.DEFINE_string("predictions", None, "Write per-example predictions here (JSON lines).")
    flags.DEFINE_string(
        "mesh",
        "",
        "Decode sharded as training: e.g. data=-1,fsdp=1,tensor=1 (as config.mesh); empty: one device.",
    )


# ---------------------------------------------------------------- per-task pieces


def _load_coco(files, image_root, split):
    from mllm_jax.evaluation import loaders

    if split is not None:
        raise UsageError("--split: coco_captions evaluates the whole annotation file")
    return loaders.load_coco_captions(files[0], image_root)


def _load_vqav2(files, image_root, split):
    from mllm_jax.evaluation import loaders

    return loaders.load_vqav2(files[0], image_root, files[1] if len(files) > 1 else None, split=split)


def _load_referring(files, image_root, split):
    from mllm_jax.evaluation import loaders

    return loaders.load_referring(files[0], image_root, split=split)


def _caption_reference(index, r):
    return {"id": r["image_id"], "references": r["captions"]}


def _vqa_reference(index, r):
    keep = ("answers", "answer_type")  # absent without annotations (test-dev)
    return {"id": r["question_id"], "image_id": r["image_id"], "question": r["question"]} | {
        k: r[k] for k in keep if k in r
    }


def _referring_reference(index, r):
    # one line per expression; RefCOCO's ref_id repeats over a ref's sentences, so the id is the index
    passed = {k: r[k] for k in ("ref_id", "split") if k in r}
    return {"id": index, **passed, "expression": r["expression"], "target_box": r["box_xyxy"]}


def _parse_box(prediction: str, image) -> dict:
    from mllm_jax.data import boxes

    width, height = image.size
    return {"box": boxes.tokens_to_box(prediction, width, height), "width": width, "height": height}


def _score_captions(lines) -> dict:
    from mllm_jax.evaluation import metrics

    refs = {line["id"]: line["references"] for line in lines}
    return metrics.caption_scores(refs, {line["id"]: line["prediction"] for line in lines})


def _vqa_rows(lines, suffix: str = "") -> dict:
    from mllm_jax.evaluation import metrics

    preds, answers = [line["prediction"] for line in lines], [line["answers"] for line in lines]
    matches = [metrics.exact_match(line["prediction"], line["answers"]) for line in lines]
    return {
        f"vqa_accuracy{suffix}": metrics.mean_vqa_accuracy(preds, answers),
        f"exact_match{suffix}": float(np.mean(matches)),
    }


def _score_vqa(lines) -> dict:
    if not all("answers" in line for line in lines):
        return {}  # no public answers (test-dev): the predictions file is the result
    rows = _vqa_rows(lines)
    for t in sorted({line["answer_type"] for line in lines}):
        rows.update(_vqa_rows([line for line in lines if line["answer_type"] == t], f"/{t}"))
    return rows


def _score_grounding(lines) -> dict:
    from mllm_jax.evaluation import metrics

    found = [line["box"] for line in lines]
    return {
        "grounding_accuracy": metrics.grounding_accuracy(found, [line["target_box"] for line in lines]),
        "parsed_boxes": float(np.mean([b is not None for b in found])),
    }


@dataclasses.dataclass(frozen=True)
class Task:
    """A task read from annotation files: how to load it, ask the model, and score the answers."""

    load: Callable  # (data files, image root, split) -> records (mllm_jax.evaluation.loaders)
    files: tuple[int, int]  # how many --data files: (min, max)
    prompt: str  # default template; "{field}" becomes the record's field
    fields: tuple[str, ...]  # the record fields the template must use
    max_new_tokens: int
    reference: Callable  # (index, record) -> the prediction line's id and references
    score: Callable  # prediction lines -> metrics
    parse: Callable | None = None  # (prediction, PIL image) -> more fields of the line (a box)


# Default prompts follow LLaVA-1.5's evaluation prompts; the box prompt is PaliGemma's "detect".
TASKS = {
    "coco_captions": Task(
        _load_coco,
        (1, 1),
        "USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT:",
        (),
        32,
        _caption_reference,
        _score_captions,
    ),
    "vqav2": Task(
        _load_vqav2,
        (1, 2),
        "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:",
        ("question",),
        10,
        _vqa_reference,
        _score_vqa,
    ),
    "refcoco": Task(
        _load_referring,
        (1, 1),
        "USER: <image>\ndetect {expression} ASSISTANT:",
        ("expression",),
        12,
        _referring_reference,
        _score_grounding,
        _parse_box,
    ),
}
SYNTHETIC = "synthetic_vqa"
SYNTHETIC_DEFAULTS = dict(template="tiny", num_questions=256)  # as training's eval
# tasks on the built-in held-out data -> their default max_new_tokens (runners: SYNTHETIC_RUNS)
SYNTHETIC_TASKS = {SYNTHETIC: 3, "synthetic_grounding": 6, "synthetic_video": 3}
TASK_NAMES = (*TASKS, *SYNTHETIC_TASKS)
PLACEHOLDERS = ("question", "expression")


# ---------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Options:
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the task's default
    prompt: str | None = None  # None: the task's default
    limit: int | None = None  # first N examples (synthetic_vqa: N questions)
    mesh: object = None  # a jax Mesh to decode sharded on (parse_mesh), None: one device

    def check(self):
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_new_tokens", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")


def parse_mesh(text: str):
    """``--mesh=data=2,fsdp=2,tensor=2`` (config.mesh's axes, one may be -1: the rest) -> a Mesh over
    every device, or None for an empty string."""
    from mllm_jax import sharding

    if not text:
        return None
    spec = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
            raise UsageError(
                f"--mesh {text!r}: expected axis=size pairs of {sharding.MESH_AXES}, e.g. data=-1"
            )
        spec[key] = int(value)
    try:
        return sharding.make_mesh(spec)
    except ValueError as e:
        raise UsageError(f"--mesh {text!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
    config: object  # mllm_jax.data.synthetic.SyntheticConfig
    num_questions: int


def _synthetic_set(task, files, image_root, split, limit) -> SyntheticSet:
    from mllm_jax.data import synthetic

    if image_root is not None or split is not None:
        raise UsageError(f"--image_root and --split do not apply to {task}")
    if len(files) > 1:
        raise UsageError(f"--data: {task} takes at most one JSON file of SyntheticConfig fields")
    if files:
        if not os.path.isfile(files[0]):
            raise FileNotFoundError(f"--data {files[0]!r}: no such file")
        try:
            with open(files[0]) as f:
                fields = json.load(f)
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
            config = synthetic.SyntheticConfig(**fields)
        except (ValueError, TypeError, AttributeError) as e:
            raise UsageError(f"--data {files[0]!r}: not a SyntheticConfig JSON object ({e})") from None
    else:
        config = synthetic.SyntheticConfig()
    return SyntheticSet(config, limit or SYNTHETIC_DEFAULTS["num_questions"])


def load_task_data(task: str, data: str | Sequence[str], image_root=None, split=None, limit=None):
    """The task's examples: loader records (``limit``: the first N), or a ``SyntheticSet``."""
    if task not in TASK_NAMES:
        raise UsageError(f"--task {task!r}: unknown; known: {', '.join(TASK_NAMES)}")
    files = [f for f in data.split(",") if f] if isinstance(data, str) else list(data)
    if task in SYNTHETIC_TASKS:
        return _synthetic_set(task, files, image_root, split, limit)
    spec = TASKS[task]
    lo, hi = spec.files
    if not lo <= len(files) <= hi:
        raise UsageError(f"--data: {task} takes {lo}..{hi} comma-separated file(s), got {len(files)}")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(files[0]))
    if not os.path.isdir(root):
        raise UsageError(f"--image_root {root!r}: no such directory")
    try:
        records = spec.load(files, root, split)
    except ValueError as e:  # malformed annotation file: the message names the file and key
        raise UsageError(str(e)) from None
    records = records[:limit] if limit else records
    if not records:
        raise UsageError(f"--data {','.join(files)}: no examples" + (f" in split {split!r}" if split else ""))
    return records


def task_template(task: str, prompt: str | None) -> str:
    """``prompt`` or the task's default, checked against the task (before any model is loaded)."""
    if task in SYNTHETIC_TASKS:
        from mllm_jax.data import templates

        template = prompt or SYNTHETIC_DEFAULTS["template"]
        if template not in templates.TEMPLATES and template != templates.CHAT:
            known = ", ".join([*templates.TEMPLATES, templates.CHAT])
            raise UsageError(f"--prompt {template!r}: {task} takes a template name: {known}")
        return template
    fields = TASKS[task].fields
    template = prompt if prompt is not None else TASKS[task].prompt
    for name in PLACEHOLDERS:
        token = "{" + name + "}"
        if name in fields and token not in template:
            raise UsageError(f"--prompt {template!r}: {task} needs a {token} placeholder")
        if name not in fields and token in template:
            raise UsageError(f"--prompt {template!r}: {token} does not apply to {task}")
    return template


def fill(template: str, record: dict, fields: Sequence[str]) -> str:
    """The prompt for ``record``: each ``{field}`` replaced (other braces are left alone)."""
    for name in fields:
        template = template.replace("{" + name + "}", record[name])
    return template


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"image {path!r}: not a readable image ({e})") from None


# ---------------------------------------------------------------- generation


def _pad_columns(arrays, cap: int | None) -> np.ndarray:
    """``[1, T_i]`` arrays -> ``[B, T]``, zero-padded (zero = masked for the Q-Former) to a bucketed T,
    at most ``cap`` (InstructBLIP's Q-Former text has only so many positions)."""
    from mllm_jax.inference import generate

    longest = max(a.shape[1] for a in arrays)
    t = -(-longest // generate.PROMPT_BUCKET) * generate.PROMPT_BUCKET
    t = max(longest, min(t, cap)) if cap else t
    return np.concatenate([np.pad(a, ((0, 0), (0, t - a.shape[1]))) for a in arrays])


def batch_inputs(inputs: list, size: int, max_columns: int | None = None):
    """Prepared examples -> ``generate``'s prompts, pixels and embed kwargs, padded to ``size`` rows
    with copies of the last example so every batch has one shape (one compilation per prompt bucket)."""
    inputs = inputs + [inputs[-1]] * (size - len(inputs))
    pixels = None if inputs[0].pixels is None else np.concatenate([x.pixels for x in inputs])
    kwargs = {
        k: _pad_columns([x.embed_kwargs[k] for x in inputs], max_columns) for k in inputs[0].embed_kwargs
    }
    return [x.tokens for x in inputs], pixels, kwargs


def _run_file_task(task: str, pretrained, assets: str, records: list[dict], options: Options):
    from mllm_jax import models
    from mllm_jax.inference import generate

    spec = TASKS[task]
    template = task_template(task, options.prompt)
    max_new = options.max_new_tokens or spec.max_new_tokens
    size = min(options.batch_size, len(records))
    model = tokenizer = eos = None
    lines = []
    for start in range(0, len(records), size):
        chunk = records[start : start + size]
        images = [_open_image(r["image"]) for r in chunk]
        prompts = [fill(template, r, spec.fields) for r in chunk]
        inputs = [
            predict.prepare_inputs(pretrained.family, pretrained.config, assets, p, [im])
            for p, im in zip(prompts, images, strict=True)
        ]
        if model is None:  # the first example completes the config as predict does (IDEFICS)
            tokenizer = inputs[0].tokenizer
            model = models.build(pretrained.family, inputs[0].config or pretrained.config)
            eos = predict.eos_token_ids(assets, pretrained.hf_config, tokenizer)
            params = pretrained.params  # on the mesh once, not per batch
            if options.mesh is not None:
                params = generate.place_params(model, params, options.mesh)
        qformer = getattr(pretrained.config, "qformer", None)  # BLIP-2 family only
        tokens, pixels, kwargs = batch_inputs(inputs, size, qformer and qformer.max_positions)
        try:
            results = generate.generate(
                model,
                params,
                tokens,
                pixels,
                embed_kwargs=kwargs,
                max_new_tokens=max_new,
                eos_ids=eos,
                pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                mesh=options.mesh,
            )
        except ValueError as e:  # e.g. prompt + max_new_tokens longer than the model's positions
            raise UsageError(str(e)) from None
        outputs = zip(results[: len(chunk)], chunk, prompts, images, strict=True)  # padding rows dropped
        for i, ((ids, _), record, prompt, image) in enumerate(outputs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            line = {
                **spec.reference(start + i, record),
                "image": record["image"],
                "prompt": prompt,
                "generated": text,
                "prediction": first_line(text),
            }
            lines.append(line | (spec.parse(line["prediction"], image) if spec.parse else {}))
        logging.info("evaluated %d/%d examples", len(lines), len(records))
    return spec.score(lines), lines


def _synthetic_args(task: str, pretrained, assets: str, options: Options) -> tuple:
    """``(model, params, tokenizer, image_spec, model_spec, template)`` as the synthetic evals take them."""
    from transformers import AutoTokenizer

    from mllm_jax import models
    from mllm_jax.errors import ConfigError
    from mllm_jax.families import RECIPES
    from mllm_jax.inference import generate
    from mllm_jax.training import wiring

    if pretrained.family not in RECIPES:
        raise UsageError(f"{task} needs an image-text model, not {pretrained.family!r}")
    template = task_template(task, options.prompt)
    tokenizer = AutoTokenizer.from_pretrained(assets, trust_remote_code=False)
    try:
        image_spec = wiring.image_spec_of_assets(assets)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    model_spec = RECIPES[pretrained.family].model_spec(pretrained.config, tokenizer)
    model = models.build(pretrained.family, pretrained.config)
    params = pretrained.params
    if options.mesh is not None:  # on the mesh once, not per batch
        params = generate.place_params(model, params, options.mesh)
    return model, params, tokenizer, image_spec, model_spec, template


def _run_synthetic(pretrained, assets: str, data: SyntheticSet, options: Options, keep_predictions: bool):
    from mllm_jax.data import fewshot, templates
    from mllm_jax.evaluation import vqa

    args = _synthetic_args(SYNTHETIC, pretrained, assets, options)
    _, _, tokenizer, _, _, template = args
    max_new = options.max_new_tokens or SYNTHETIC_TASKS[SYNTHETIC]
    n = data.num_questions
    rows = vqa.synthetic_vqa(
        *args,
        data.config,
        num_questions=n,
        batch_size=options.batch_size,
        max_new_tokens=max_new,
        mesh=options.mesh,
    )
    if not keep_predictions:
        return rows, []
    # a second pass (same compilation) for the per-question answers synthetic_vqa does not return
    items = fewshot.heldout_questions(data.config, n)
    answers = vqa.answer_questions(
        *args, items, False, min(options.batch_size, n), max_new, mesh=options.mesh
    )
    lines = [
        {
            "id": i,
            "type": item["type"],
            "question": item["question"],
            "prompt": templates.render_text(template, tokenizer, fewshot.fewshot_turns([], item)),
            "prediction": answer,
            "answers": [item["answer"]],
        }
        for i, (item, answer) in enumerate(zip(items, answers, strict=True))
    ]
    return rows, lines


def _run_synthetic_grounding(
    pretrained, assets: str, data: SyntheticSet, options: Options, keep_predictions: bool
):
    from mllm_jax.data import templates
    from mllm_jax.data.interleaved import vqa_turns
    from mllm_jax.evaluation import grounding

    task = "synthetic_grounding"
    args = _synthetic_args(task, pretrained, assets, options)
    tokenizer, template, size = args[2], args[5], data.config.image_size
    try:
        rows, answers = grounding.grounding_predictions(
            *args,
            data.config,
            num_questions=data.num_questions,
            batch_size=options.batch_size,
            max_new_tokens=options.max_new_tokens or SYNTHETIC_TASKS[task],
            mesh=options.mesh,
        )
    except ValueError as e:  # a model without location tokens
        raise UsageError(f"{task}: {e}") from None
    lines = []
    for kind, (items, texts) in answers.items():
        found, ious = grounding.grounding_boxes(texts, items, size)
        for item, text, box, iou in zip(items, texts, found, ious, strict=True):
            prompt = templates.render_text(template, tokenizer, vqa_turns(item)[:1])
            line = {"id": len(lines), "type": kind, "question": item["question"], "prompt": prompt}
            line |= {"prediction": text, "answers": [item["answer"]], "target_box": list(item["box"])}
            lines.append(line | ({"box": box, "iou": iou} if kind == "grounding" else {}))
    return rows, lines if keep_predictions else []


def _run_synthetic_video(
    pretrained, assets: str, data: SyntheticSet, options: Options, keep_predictions: bool
):
    from mllm_jax.data import templates
    from mllm_jax.data.video import clip_turns, heldout_clips
    from mllm_jax.evaluation import video

    task = "synthetic_video"
    args = _synthetic_args(task, pretrained, assets, options)
    tokenizer, template = args[2], args[5]
    items = heldout_clips(data.config, data.num_questions)
    batch, max_new = min(options.batch_size, len(items)), options.max_new_tokens or SYNTHETIC_TASKS[task]
    answers = {
        static: video.answer_clips(*args, items, static, batch, max_new, mesh=options.mesh)
        for static in (False, True)
    }
    rows = video.motion_rows(answers[False], items) | video.motion_rows(answers[True], items, "_static")
    lines = [
        {
            "id": i,
            "type": item["type"],
            "question": item["question"],
            "prompt": templates.render_text(
                template, tokenizer, clip_turns(len(item["frames"]), item["question"])
            ),
            "prediction": answers[False][i],
            "prediction_static": answers[True][i],
            "answers": [item["answer"]],
        }
        for i, item in enumerate(items)
    ]
    return rows, lines if keep_predictions else []


# synthetic task -> (pretrained, assets, SyntheticSet, options, keep_predictions) -> (metrics, lines)
SYNTHETIC_RUNS = {
    SYNTHETIC: _run_synthetic,
    "synthetic_grounding": _run_synthetic_grounding,
    "synthetic_video": _run_synthetic_video,
}


def run_task(
    pretrained, assets: str, task: str, examples, options: Options = Options(), keep_predictions=True
):
    """Metrics and prediction lines of a loaded model (``hf.Pretrained`` + its HF assets directory) on
    ``examples`` from ``load_task_data``: the entry point for evaluation inside training."""
    options.check()
    if task in SYNTHETIC_RUNS:
        return SYNTHETIC_RUNS[task](pretrained, assets, examples, options, keep_predictions)
    return _run_file_task(task, pretrained, assets, examples, options)


def evaluate(
    model_path: str,
    task: str,
    data: str | Sequence[str] = "",
    *,
    image_root: str | None = None,
    split: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    limit: int | None = None,
    predictions: str | None = None,
    mesh: str = "",
) -> dict:
    """``{"task", "model", "num_examples", **metrics}``; per-example lines go to ``predictions``."""
    from mllm_jax.training import checkpoint

    options = Options(batch_size, max_new_tokens, prompt, limit, parse_mesh(mesh))
    options.check()
    if predictions and not os.path.isdir(os.path.dirname(os.path.abspath(predictions))):
        raise UsageError(f"--predictions {predictions!r}: its directory does not exist")
    examples = load_task_data(task, data, image_root, split, limit)  # bad input fails before the model loads
    task_template(task, prompt)
    pretrained, assets = checkpoint.load_any(model_path)
    logging.info("loaded %s model from %s", pretrained.family, model_path)
    metrics, lines = run_task(pretrained, assets, task, examples, options, keep_predictions=bool(predictions))
    if predictions:
        with open(predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        logging.info("wrote %d predictions to %s", len(lines), predictions)
    n = examples.num_questions if task in SYNTHETIC_TASKS else len(examples)
    return {"task": task, "model": model_path, "num_examples": n, **metrics}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mllm_jax.errors import ConfigError, ConversionError

    if not FLAGS.model or not FLAGS.task:
        print("error: --model and --task are required", file=sys.stderr)
        sys.exit(2)
    try:
        result = evaluate(
            FLAGS.model,
            FLAGS.task,
            FLAGS.data,
            image_root=FLAGS.image_root,
            split=FLAGS.split,
            batch_size=FLAGS.batch_size,
            max_new_tokens=FLAGS.max_new_tokens,
            prompt=FLAGS.prompt,
            limit=FLAGS.limit,
            predictions=FLAGS.predictions,
            mesh=FLAGS.mesh,
        )
    except (UsageError, ConversionError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
