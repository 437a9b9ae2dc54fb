"""The stage optimizer (training/optim.py): AdamW as optax computes it, Adam's moments stored in
``moment_dtype``, and bf16 params through the real train step (dtypes kept, one compilation)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sharded_step

from mllm_jax.errors import ConfigError
from mllm_jax.models import params as param_tree
from mllm_jax.training import optim, runconfig, train

PARAMS = {"w": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}, "b": {"bias": jnp.ones(4)}}


def _grads(i: int):
    key = jax.random.key(i)
    return jax.tree.map(lambda p: jax.random.normal(key, p.shape) * (i + 1), PARAMS)


def _run(tx, params, steps: int = 3):
    state = tx.init(params)
    for i in range(steps):
        updates, state = tx.update(_grads(i), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_float32_moments_are_optax_adamw():
    c = optim.OptimConfig(learning_rate=1e-2, weight_decay=0.1, clip_norm=2.0, warmup_steps=0)
    ours, _ = optim.make_optimizer(c, total_steps=10)
    lr = optim.schedule(c, 10)
    decay = {"w": {"kernel": True}, "b": {"bias": False}}
    reference = optax.chain(
        optax.clip_by_global_norm(c.clip_norm),
        optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay),
    )
    got, state = _run(ours, PARAMS)
    want, want_state = _run(reference, PARAMS)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    # the same state tree as optax.adamw's (checkpoints of either load into the other)
    assert jax.tree.structure(state) == jax.tree.structure(want_state)


def test_bfloat16_moments_are_stored_in_bfloat16_and_track_float32():
    c = optim.OptimConfig(learning_rate=1e-2, warmup_steps=0, moment_dtype="bfloat16")
    tx, _ = optim.make_optimizer(c, total_steps=10)
    params, state = _run(tx, PARAMS)
    mu, nu = optax.tree_utils.tree_get(state, "mu"), optax.tree_utils.tree_get(state, "nu")
    assert {x.dtype for x in jax.tree.leaves((mu, nu))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}  # params keep theirs
    f32, _ = _run(optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)[0], PARAMS)
    # bf16 keeps 8 bits of mantissa: the moments' rounding moves the params by a small part of the step
    chex.assert_trees_all_close(params, f32, atol=3 * 1e-2 * 2**-6)
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(f32), strict=True)
    )


def test_moment_dtype_is_checked():
    c = sharded_step.llava()
    c.stages.instruct.moment_dtype = "float16"
    with pytest.raises(ConfigError, match=r"config.stages.instruct.moment_dtype"):
        runconfig.from_config_dict(c)


def test_bfloat16_params_and_moments_through_the_train_step(tmp_path):
    """bf16 storage end to end: the step returns every state leaf in the dtype it got (so the second
    step neither compiles again nor grows the state), and the params move."""
    c = sharded_step.llava()
    c.param_dtype = "bfloat16"
    c.stage_order = ("instruct",)
    c.stages.instruct.update(batch_size=4, warmup_steps=0, moment_dtype="bfloat16", learning_rate=1e-2)
    run = runconfig.from_config_dict(c)
    trainer = train.Trainer(run, str(tmp_path / "bf16"), devices=jax.devices()[:1])
    params, _ = trainer._initial_params(None)
    (stage,) = run.stages
    state, tx, lr = trainer.stage_state(stage, params)
    dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree) if x.ndim}  # noqa: E731
    assert dtypes(state["trainable"]) == dtypes(state["opt_state"]) == {jnp.dtype(jnp.bfloat16)}
    before = jax.tree.map(np.asarray, state["trainable"])
    before_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    iterator = trainer.setup.data_iterator(stage, seed=0)
    for i in range(2):
        state, metrics = trainer.step(stage, tx, lr, state, next(iterator), jax.random.key(i))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == before_types
    assert trainer._step_fns["fn"]._cache_size() == 1
    assert float(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    after, start = param_tree.flatten(state["trainable"]), param_tree.flatten(before)
    still = sorted(k for k in after if np.array_equal(after[k], start[k]))
    assert len(still) < len(after) / 10, still
