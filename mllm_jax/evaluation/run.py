"""Evaluate a model on a task: read the task's data, load the model, ask it, score the answers.

The library behind ``python -m mllm_jax.evaluate`` (docs/evaluation.md): ``evaluate`` from a model
path, ``load_task_data`` + ``run_task`` for a model already in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
from absl import logging

from mllm_jax.errors import UsageError
from mllm_jax.evaluation import family_hooks
from mllm_jax.evaluation.options import Options, parse_mesh
from mllm_jax.evaluation.tasks import SUBMISSIONS, TASK_NAMES, TASKS

__all__ = [
    "TASKS",
    "TASK_NAMES",
    "Options",
    "evaluate",
    "load_task_data",
    "parse_mesh",
    "run_task",
    "task_template",
]


def load_task_data(task: str, data: str | Sequence[str], image_root=None, split=None, limit=None):
    """The task's examples: loader records (``limit``: the first N), or a ``SyntheticSet``."""
    if task not in TASKS:
        raise UsageError(f"--task {task!r}: unknown; known: {', '.join(TASK_NAMES)}")
    files = [f for f in data.split(",") if f] if isinstance(data, str) else list(data)
    return TASKS[task].read(files, image_root, split, limit)


def task_template(task: str, prompt: str | None) -> str:
    """``prompt`` or the task's default, checked against the task (before any model is loaded)."""
    return TASKS[task].template(prompt)


def run_task(
    pretrained, assets: str, task: str, examples, options: Options = Options(), keep_predictions=True
):
    """Metrics and prediction lines of a loaded model (``hf.Pretrained`` + its HF assets directory) on
    ``examples`` from ``load_task_data``."""
    options.check()
    return TASKS[task].run(pretrained, assets, examples, options, keep_predictions)


def submission_path(predictions: str, suffix: str) -> str:
    """``out/seed.jsonl`` -> ``out/seed.submission.jsonl``: the leaderboard's file beside the lines."""
    return os.path.splitext(predictions)[0] + ".submission" + suffix


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
    mc: str = "generate",
) -> dict:
    """``{"task", "model", "num_examples", **metrics}``; per-example lines go to ``predictions`` (and,
    for a task with a leaderboard format, that file to ``submission_path(predictions)``)."""
    options = Options(batch_size, max_new_tokens, prompt, limit, parse_mesh(mesh), mc)
    options.check()
    if predictions and not os.path.isdir(os.path.dirname(os.path.abspath(predictions))):
        raise UsageError(f"--predictions {predictions!r}: its directory does not exist")
    examples = load_task_data(task, data, image_root, split, limit)  # bad input fails before the model loads
    task_template(task, prompt)
    if mc != "generate" and not getattr(TASKS[task], "multiple_choice", False):
        raise UsageError(f"--mc={mc}: {task} is not a multiple-choice task")
    pretrained, assets = family_hooks.load_model(model_path)
    logging.info("loaded %s model from %s", pretrained.family, model_path)
    metrics, lines = run_task(pretrained, assets, task, examples, options, keep_predictions=bool(predictions))
    if predictions and jax.process_index() == 0:  # one writer on multi-process runs
        with open(predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        logging.info("wrote %d predictions to %s", len(lines), predictions)
        if task in SUBMISSIONS:
            suffix, content = SUBMISSIONS[task](lines)  # text, or bytes (MMBench's .xlsx)
            with open(submission_path(predictions, suffix), "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    return {"task": task, "model": model_path, "num_examples": TASKS[task].count(examples), **metrics}
