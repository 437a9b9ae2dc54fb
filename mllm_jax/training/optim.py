"""Optimizer per training stage: AdamW, warmup + cosine, clipping, accumulation, frozen param paths.

Params are split by path patterns (regexes on ``"vision/layers_0/mlp/fc1/kernel"``-style paths) into a
trainable tree and a frozen tree. Gradients are taken w.r.t. the trainable tree only, and the
optimizer state covers only it: frozen params cost neither gradient memory nor Adam moments.
"""

from __future__ import annotations

import dataclasses

import optax

from mllm_jax import schema
from mllm_jax.models import params as param_tree

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
        flat = param_tree.flatten(tree)
        return param_tree.unflatten({k: not param_tree.matches(k, c.no_decay) for k in flat})

    parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
    parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask))
    return optax.chain(*parts), lr
