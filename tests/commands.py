"""The public commands as the tests run them: ``python -m mllm_jax.<command>`` in this checkout, and
the small LLaVA the training tests train (each of its compilations takes a few seconds)."""

from __future__ import annotations

import json
import os
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/llava.py:tiny shrunk: a model small enough that each compilation takes a few seconds.
SMALL = [
    "--config.model.vision.num_layers=1",
    "--config.model.vision.hidden_size=32",
    "--config.model.vision.intermediate_size=64",
    "--config.model.llm.num_layers=1",
    "--config.model.llm.hidden_size=32",
    "--config.model.llm.intermediate_size=64",
    "--config.model.llm.head_dim=8",
    "--config.stages.align.batch_size=4",
    "--config.stages.instruct.batch_size=4",
    "--config.log_every=1",
    "--config.eval.num_questions=8",
    "--config.eval.batch_size=8",
    "--config.tensorboard=False",
]


def xla_env(devices: int | None = None, **extra: str) -> dict:
    """This process's environment (with conftest's XLA flags) for a command on ``devices`` CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)


def main_cmd(workdir, *flags, config="configs/llava.py:tiny"):
    """``python -m mllm_jax.main`` on ``config`` shrunk by ``SMALL``, then ``flags``."""
    return [
        sys.executable,
        "-m",
        "mllm_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *SMALL,
        *flags,
    ]


def rows(workdir) -> list[dict]:
    """The complete rows of a run's metrics.jsonl so far (none before it exists), while it runs."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_cmd(module, *flags):
    return [sys.executable, "-m", module, *flags]


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# `python -m mllm_jax.main`, with SIGTERM sent to itself right after a chosen step (1-based count of
# steps this process ran): deterministic where an outside signal can only aim at a window.
SIGTERM_AFTER_STEP = """
import os, signal, sys
from mllm_jax import main
from mllm_jax.training import train

after, calls, step = int(sys.argv.pop(1)), [0], train.Trainer.step

def counted(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == after:
        os.kill(os.getpid(), signal.SIGTERM)
    return out

train.Trainer.step = counted
main.run()
"""
