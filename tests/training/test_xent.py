"""The chunked LM loss (``stages.<name>.loss_chunk``, training/xent.py) equals the whole-sequence one:
loss, accuracy and every gradient, for the three decoders' heads (LLaMA's, IDEFICS' with its extra
vocabulary rows and its norm inside the head, OPT's through BLIP-2)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharded_step

from mllm_jax.errors import ConfigError
from mllm_jax.training import runconfig, step, wiring, xent

CASES = {
    "llava": (sharded_step.llava, "instruct"),
    "idefics": (lambda: sharded_step.flamingo(False), "align"),
    "blip2": (sharded_step.blip2, "generate"),
}


def _setup_and_batch(case: str):
    build, stage_name = CASES[case]
    c = build()
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.stage_order = (stage_name,)
    c.stages[stage_name].batch_size = 3
    run = runconfig.from_config_dict(c)
    setup = wiring.RunSetup(run, "")
    batch = next(setup.data_iterator(run.stages[0], seed=0))
    return setup, {k: jnp.asarray(v) for k, v in batch.items() if k in step.BATCH_KEYS}


@pytest.mark.parametrize("case", ["llava", "idefics", pytest.param("blip2", marks=pytest.mark.slow)])
def test_chunked_loss_and_grads_equal_the_whole_sequence(case):
    setup, batch = _setup_and_batch(case)
    t = batch["tokens"].shape[1]
    chunk = 7 if t % 7 else 5  # not a divisor: the padded last chunk must not count

    @jax.jit  # one compilation: init, then both losses and their gradients
    def losses(key):
        params = nn.meta.unbox(setup.init_fn(key))
        fn = lambda p, chunk: step.lm_loss(setup.model, p, batch, None, chunk=chunk)  # noqa: E731
        grad = jax.value_and_grad(fn, has_aux=True)
        return grad(params, 0), grad(params, chunk)

    ((whole, aux), grads), ((chunked, chunked_aux), chunked_grads) = losses(jax.random.key(0))
    assert aux["count"] > 0 and t % chunk
    # per token the same f32 arithmetic; only the order of the sums differs
    np.testing.assert_allclose(chunked / aux["count"], whole / aux["count"], rtol=1e-6)
    assert chunked_aux["correct"] == aux["correct"] and chunked_aux["count"] == aux["count"]
    chex.assert_trees_all_close(chunked_grads, grads, rtol=1e-6, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3  # gradients that matter


def test_loss_chunk_is_for_the_lm_loss_only():
    c = sharded_step.llava()
    c.stages.instruct.loss_chunk = -1
    with pytest.raises(ConfigError, match="loss_chunk"):
        runconfig.from_config_dict(c)
    c = sharded_step.blip2()
    c.stages.qformer.loss_chunk = 256
    with pytest.raises(ConfigError, match="stages.qformer.loss_chunk applies to loss 'lm' only"):
        runconfig.from_config_dict(c)


def test_token_nll_and_its_gradient_equal_the_log_softmax():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 5)))
    weights = jnp.asarray(rng.random((3, 5)), jnp.float32)

    def ref(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights).sum()

    def ours(logits):
        return (xent.token_nll(logits, targets) * weights).sum()

    chex.assert_trees_all_close(ours(logits), ref(logits), rtol=1e-6)
    chex.assert_trees_all_close(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-6)
