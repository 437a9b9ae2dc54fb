"""``scan_layers`` and ``remat`` are switches: the same params (restacked) give the same numbers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.inference.generate import generate
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import Llava, LlavaConfig
from mllm_jax.models.projector import ProjectorConfig
from mllm_jax.models.scan import is_stacked, stack_layers, unstack_layers
from mllm_jax.models.vit import VitConfig

CONFIG = LlavaConfig(
    vision=VitConfig(
        hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2, image_size=8, patch_size=4
    ),
    projector=ProjectorConfig(32, 24),
    llm=LlmConfig(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=32,
        num_layers=3,
        num_heads=2,
        num_kv_heads=1,
        head_dim=12,
        max_positions=64,
    ),
    image_token_id=39,
    vision_feature_layers=(-3, -1),
)
TOKENS = jnp.array([[1, 39, 39, 39, 39, 5, 6, 7, 8, 9]])
IMAGES = jax.random.normal(jax.random.key(0), (1, 1, 8, 8, 3))


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(jax.jit(Llava(CONFIG).init)(jax.random.key(1), TOKENS, IMAGES)["params"])


def test_stack_and_unstack_are_inverse(params):
    stacked = stack_layers(params)
    assert is_stacked(stacked) and not is_stacked(params)
    assert stacked["llm"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 24, 32)
    chex.assert_trees_all_equal(unstack_layers(stacked), params)
    abstract = jax.eval_shape(Llava(CONFIG, scan_layers=True).init, jax.random.key(1), TOKENS, IMAGES)[
        "params"
    ]
    assert jax.tree.structure(nn.meta.unbox(abstract)) == jax.tree.structure(stacked)


@pytest.mark.parametrize(("scan", "remat"), [(True, "none"), (False, "full"), (True, "minimal")])
def test_scan_and_remat_give_the_same_logits_and_gradients(params, scan, remat):
    def loss(model, p):
        return model.apply({"params": p}, TOKENS, IMAGES)[0].astype(jnp.float32).std()

    base_loss, base_grads = jax.jit(jax.value_and_grad(lambda p: loss(Llava(CONFIG), p)))(params)
    model = Llava(CONFIG, remat=remat, scan_layers=scan)
    p = stack_layers(params) if scan else params
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(p)
    np.testing.assert_allclose(value, base_loss, rtol=1e-6)
    chex.assert_trees_all_close(unstack_layers(grads) if scan else grads, base_grads, atol=1e-6, rtol=1e-5)


def test_scanned_model_decodes_like_the_unscanned_one(params):
    kw = dict(max_new_tokens=5, eos_ids=[], pad_id=0)
    prompts = [TOKENS[0].tolist()]
    plain = generate(Llava(CONFIG), params, prompts, np.asarray(IMAGES), **kw)
    scanned = generate(
        Llava(CONFIG, scan_layers=True), stack_layers(params), prompts, np.asarray(IMAGES), **kw
    )
    assert plain[0][0] == scanned[0][0]
    np.testing.assert_allclose(plain[0][1], scanned[0][1], atol=1e-5)
