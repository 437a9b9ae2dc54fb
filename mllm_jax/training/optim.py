"""Optimizer per training stage: AdamW, warmup + cosine, clipping, accumulation, frozen param paths.

Params are split by path patterns (regexes on ``"vision/layers_0/mlp/fc1/kernel"``-style paths) into a
trainable tree and a frozen tree. Gradients are taken w.r.t. the trainable tree only, and the
optimizer state covers only it: frozen params cost neither gradient memory nor Adam moments.

Adam's two moments are stored in ``moment_dtype`` (float32, or bfloat16 to halve them) whatever the
params' dtype; the update itself is always computed in float32 and added to the params in their own
dtype (``param_dtype``). There is no separate float32 master copy: with bf16 params an update smaller
than half a bf16 step of its weight (about 2**-9 of it) rounds away (docs/scaling.md, Memory).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from mllm_jax import schema
from mllm_jax.models import params as param_tree

SCHEDULES = ("cosine", "linear", "constant")
MOMENT_DTYPES = ("float32", "bfloat16")
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
    moment_dtype: str = "float32"  # Adam's mu and nu as stored (the update is computed in float32)

    def check(self, where: str):
        schema.one_of(self.schedule, SCHEDULES, where + "schedule")
        schema.one_of(self.moment_dtype, MOMENT_DTYPES, where + "moment_dtype")
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
    # optax.adamw's own chain (the same state tree, so checkpoints load either way) with our Adam
    adamw = optax.chain(
        scale_by_adam(c.b1, c.b2, c.eps, jnp.dtype(c.moment_dtype)),
        optax.add_decayed_weights(c.weight_decay, decay_mask),
        optax.scale_by_learning_rate(lr),
    )
    parts.append(adamw)
    return optax.chain(*parts), lr


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with both moments stored in ``moment_dtype`` (optax casts only ``mu``;
    ``nu`` follows the params) and all arithmetic in float32, so bf16 storage costs only rounding."""

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)  # noqa: E731
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
        )

    def update(updates, state, params=None):
        del params
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
        count = optax.safe_increment(state.count)
        mu_fix, nu_fix = 1 - b1 ** f32(count), 1 - b2 ** f32(count)
        out = jax.tree.map(lambda m, v: (m / mu_fix) / (jnp.sqrt(v / nu_fix) + eps), mu, nu)
        store = lambda tree: jax.tree.map(lambda x: x.astype(moment_dtype), tree)  # noqa: E731
        return out, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

    return optax.GradientTransformation(init, update)
