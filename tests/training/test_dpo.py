"""The DPO loss (training/dpo.py) against a direct numpy computation, and the DPO train step: the
reference is the stage's starting params, frozen, inside the same jitted step (with LoRA: no copy of the
base)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import schema, sharding
from mllm_jax.training import dpo, step
from mllm_jax.training.runconfig import Stage

V, D, T = 11, 8, 6


class Toy(nn.Module):
    """A token embedding plus the images' mean pixel, then logits: the apply signature of our models."""

    @nn.compact
    def __call__(self, tokens_BxT, images, positions=None, attention_mask=None):
        x = nn.Embed(V, D, name="embed")(tokens_BxT)
        picture = nn.Dense(D, name="adapter")(images.mean(axis=(1, 2, 3)))  # [B, C] -> [B, D]
        return nn.Dense(V, name="head")(jnp.tanh(x + picture[:, None])), None


def _batch(b=3, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, 2, T), np.float32)
    mask[:, :, 2:5] = 1.0
    mask[0, 1, 4] = 0.0  # rows of a pair may differ in length
    return {
        "tokens": rng.integers(0, V, (b, 2, T)).astype(np.int32),
        "targets": rng.integers(0, V, (b, 2, T)).astype(np.int32),
        "loss_mask": mask,
        "attention_mask": np.ones((b, 2, T), np.int32),
        "images": rng.normal(size=(b, 1, 4, 4, 3)).astype(np.float32),
    }


def _numpy_logps(model, params, batch):
    """Summed target log-probs per row in float64 numpy, from the model's logits of every row (each
    pair's images repeated by hand)."""
    b = batch["tokens"].shape[0]
    images = np.repeat(batch["images"], 2, axis=0)
    logits, _ = jax.jit(model.apply)({"params": params}, batch["tokens"].reshape(2 * b, T), images)
    z = np.asarray(logits, np.float64).reshape(b, 2, T, V)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return (picked * batch["loss_mask"]).sum(-1)


def test_dpo_loss_equals_a_direct_numpy_computation():
    model, batch, beta = Toy(), _batch(), 0.3
    policy = model.init(jax.random.key(0), batch["tokens"][:, 0], batch["images"])["params"]
    reference = model.init(jax.random.key(1), batch["tokens"][:, 0], batch["images"])["params"]
    full = batch | dpo.reference_logps(model, reference, batch)
    loss_sum, aux = dpo.dpo_loss(model, policy, full, None, beta=beta)

    pi, ref = _numpy_logps(model, policy, batch), _numpy_logps(model, reference, batch)
    margin = beta * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1]))
    losses = np.log1p(np.exp(-margin))  # -log sigmoid
    assert np.abs(margin).min() > 1e-3  # a non-trivial batch: both signs of the margin are exercised
    assert (margin > 0).any() and (margin < 0).any()
    np.testing.assert_allclose(loss_sum, losses.sum(), rtol=1e-5)
    np.testing.assert_allclose(aux["dpo/loss"], losses.sum(), rtol=1e-5)
    np.testing.assert_allclose(aux["dpo/reward_margin"], margin.sum(), rtol=1e-4, atol=1e-6)
    assert aux["dpo/accuracy"] == aux["correct"] == (margin > 0).sum()
    assert aux["count"] == 3
    np.testing.assert_allclose(full[dpo.REFERENCE], ref, rtol=1e-5, atol=1e-5)


def _stage(**overrides):
    d = dict(
        trainable=(r"head/.*",),
        loss="dpo",
        beta=0.5,
        learning_rate=0.05,
        warmup_steps=0,
        steps=10,
        data=dict(source="synthetic", task="preference"),
    )
    return schema.from_dict(Stage, d | overrides, "config.stages.dpo.", name="dpo")


def _placed_params(model, batch, mesh):
    params = model.init(jax.random.key(0), batch["tokens"][:, 0], batch["images"])["params"]
    return jax.device_put(params, sharding.replicated(mesh))


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_step_starts_at_its_reference_and_keeps_it_frozen(lora):
    model, batch = Toy(), _batch(b=4, seed=1)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    overrides = dict(trainable=(r"adapter/.*",), lora=dict(rank=2, targets=(r"head/kernel",))) if lora else {}
    stage = _stage(**overrides)
    params = _placed_params(model, batch, mesh)
    state, tx, lr_fn = step.init_state(stage, params, mesh, seed=0)
    # the reference is the stage's starting trainable params, and nothing else: LoRA's base is frozen
    chex.assert_trees_all_equal(
        state["reference"], {k: v for k, v in state["trainable"].items() if k != "lora"}
    )
    assert set(state["reference"]) == ({"adapter"} if lora else {"head"})
    start = jax.tree.map(np.asarray, state["reference"])
    fn = step.jit_step(model, stage, tx, lr_fn, dpo_loss(stage), state, mesh)
    device_batch = step.device_batch(batch, mesh)
    losses, margins = [], []
    for i in range(4):
        state, metrics = fn(state, device_batch, jax.random.key(i))
        losses.append(float(metrics["dpo/loss"]))
        margins.append(float(metrics["dpo/reward_margin"]))
    # step one: the policy is its reference, every margin 0
    np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-6)
    assert margins[0] == 0.0 and float(metrics["accuracy"]) == float(metrics["dpo/accuracy"])
    assert margins[-1] > 0 and losses[-1] < np.log(2.0)  # it learns to prefer the chosen rows
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["reference"]), start)
    trained = {k: v for k, v in state["trainable"].items() if k != "lora"}
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), trained, start)
    assert max(jax.tree.leaves(moved)) > 0


def dpo_loss(stage):
    return lambda model, params, batch, rng: dpo.dpo_loss(model, params, batch, rng, beta=stage.beta)
