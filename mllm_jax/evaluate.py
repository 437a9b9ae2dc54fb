r"""Evaluate a model on a task with the field's metrics.

    python -m mllm_jax.evaluate --model=PATH --task=NAME --data=FILE[,FILE] [--image_root=DIR] \
        [--split=S] [--batch_size=16] [--max_new_tokens=N] [--prompt=TEMPLATE] [--limit=N] \
        [--predictions=OUT.jsonl] [--mesh=data=-1,fsdp=1,tensor=1] [--mc=generate|loglik]

PATH is a HF directory or one of our checkpoints / training workdirs, loaded as ``predict`` loads it.
Tasks (``mllm_jax/evaluation/tasks.py``; one evaluator file each under ``mllm_jax/evaluation/``):

- ``coco_captions``: ``--data=captions_val2014.json`` -> CIDEr (CIDEr-D) and BLEU-1..4.
- ``vqav2``: ``--data=QUESTIONS.json[,ANNOTATIONS.json]`` -> VQAv2 accuracy (also per answer type) and
  exact match; without annotations (test-dev) only the predictions are written.
- ``refcoco``: ``--data=REFS.jsonl`` -> grounding accuracy at IoU >= 0.5 of the box the model writes as
  PaliGemma location tokens (no parseable box = a miss).
- ``synthetic_vqa``, ``synthetic_grounding``, ``synthetic_video``: the built-in held-out synthetic
  questions, boxes and clips, for our checkpoints trained on the built-in data, with the metric keys
  training logs; ``--data`` is optional (a JSON file of ``SyntheticConfig`` fields), ``--prompt`` names
  a conversation template (default ``tiny``), ``--limit`` the number of questions (default 256).

- ``gqa``, ``textvqa``, ``scienceqa``, ``pope``, ``mme``, ``mmbench``, ``seed``, ``vizwiz``, ``okvqa``: the
  LLaVA-1.5 suite read from each benchmark's released files, scored as its official script; malformed
  records are skipped and counted (``"skipped"``); ``--mc=loglik`` answers the multiple-choice ones by
  option likelihood; ``--predictions`` also writes the leaderboard's file (``OUT.submission.*``).

On several hosts every process runs the same command with the flags of ``main``
(``--distributed=on --coordinator_address=HOST:PORT --num_processes=N --process_id=I``) and a
``--mesh`` over all devices; process 0 prints the result and writes the predictions.

One JSON object of metrics goes to stdout, logs to stderr; ``--predictions`` writes one JSON line per
example. Bad input is reported in one line with exit code 2. From Python: ``evaluation.run.evaluate``.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags

from mllm_jax import distributed
from mllm_jax.errors import ConfigError, ConversionError, UsageError
from mllm_jax.evaluation.run import TASK_NAMES, evaluate

__all__ = ["evaluate"]  # kept importable as mllm_jax.evaluate.evaluate
FLAGS = flags.FLAGS
# the errors a user can fix: one line on stderr, exit code 2
USER_ERRORS = (UsageError, ConversionError, ConfigError, FileNotFoundError)


def define_flags():
    """Defined only when run as a program, so other programs can import this module."""
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
    flags.DEFINE_enum(
        "mc",
        "generate",
        ["generate", "loglik"],
        "Multiple-choice tasks (scienceqa, mmbench, seed): generate the answer, or take the option "
        "whose answer letter has the highest log-likelihood.",
    )
    flags.DEFINE_string(
        "mesh",
        "",
        "Decode sharded as training: e.g. data=-1,fsdp=1,tensor=1 (as config.mesh); empty: one device.",
    )
    distributed.define_flags()  # --distributed, --coordinator_address, --num_processes, --process_id


# evaluate()'s keyword arguments, each a flag of the same name
OPTION_FLAGS = (
    "image_root",
    "split",
    "batch_size",
    "max_new_tokens",
    "prompt",
    "limit",
    "predictions",
    "mesh",
    "mc",
)


def _exit_with(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.model or not FLAGS.task:
        _exit_with("--model and --task are required")
    try:
        distributed.start(distributed.Cluster.from_flags())  # every process runs the same command
        result = evaluate(FLAGS.model, FLAGS.task, FLAGS.data, **{k: FLAGS[k].value for k in OPTION_FLAGS})
    except USER_ERRORS as e:
        _exit_with(str(e))
    if jax.process_index() == 0:  # one result however many processes decoded it
        print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
