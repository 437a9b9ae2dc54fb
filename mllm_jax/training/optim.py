"""Optimizer per training stage: AdamW, warmup + cosine, clipping, accumulation, frozen param paths.

Params are split by path patterns (regexes on ``"vision/layers_0/mlp/fc1/kernel"``-style paths) into a
trainable tree and a frozen tree. Gradients are taken w.r.t. the trainable tree only, and the
optimizer state covers only it: frozen params cost neither gradient memory nor Adam moments.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import optax
from flax import traverse_util

from mllm_jax import schema

SCHEDULES = ("cosine", "linear", "constant")
# params without weight decay by default: biases, norm scales, embedding tables
NO_DECAY = (r".*bias", r".*scale", r".*embedding", r".*class_embedding", r".*probe")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """A stage's optimizer; its keys are the stage's own (``stages.<name>.learning_rate``)."""

    learning_rate: float = 1e-3  # peak, after warmup
    schedule: str = "cosine"  # a SCHEDULES entry, after warmup
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0  # final lr = learning_rate * end_lr_ratio
    weight_decay: float = 0.0
    # params without weight decay (regexes on param paths); Flamingo adds its tanh gates
    no_decay: tuple[str, ...] = NO_DECAY
    b1: float = 0.9
    b2: float = 0.999
    eps: float = dataclasses.field(default=1e-8, metadata={"key": False})  # not a config key
    clip_norm: float = 1.0  # 0: off

    def check(self, where: str):
        schema.one_of(self.schedule, SCHEDULES, where + "schedule")
        schema.number(self.learning_rate, where + "learning_rate")
        schema.positive(self.warmup_steps, where + "warmup_steps", allow_zero=True)
        schema.regexes(self.no_decay, where + "no_decay")


def flatten(tree) -> dict[str, object]:
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, object]):
    return traverse_util.unflatten_dict(flat, sep="/")


def matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def split_params(params, trainable: Sequence[str]):
    """``(trainable_tree, frozen_tree)``; raises if the patterns select nothing (a typo, most likely)."""
    flat = flatten(params)
    train = {k: v for k, v in flat.items() if matches(k, trainable)}
    if not train:
        examples = ", ".join(sorted(flat)[:3])
        raise ValueError(
            f"trainable patterns {list(trainable)} match no parameter (paths look like {examples})"
        )
    frozen = {k: v for k, v in flat.items() if k not in train}
    return unflatten(train), (unflatten(frozen) if frozen else {})


def merge_params(trainable, frozen):
    return unflatten({**flatten(frozen), **flatten(trainable)}) if frozen else trainable


def schedule(c: OptimConfig, total_steps: int) -> optax.Schedule:
    if c.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {c.schedule!r}")
    warmup = min(c.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = c.learning_rate * c.end_lr_ratio
    if c.schedule == "cosine":
        main = optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=c.end_lr_ratio)
    elif c.schedule == "linear":
        main = optax.linear_schedule(c.learning_rate, end, decay_steps)
    else:
        main = optax.constant_schedule(c.learning_rate)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warmup), main], [warmup])


def make_optimizer(c: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW over the trainable tree; ``total_steps`` counts optimizer updates."""
    lr = schedule(c, total_steps)

    def decay_mask(tree):
        flat = flatten(tree)
        return unflatten({k: not matches(k, c.no_decay) for k in flat})

    parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
    parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask))
    return optax.chain(*parts), lr
