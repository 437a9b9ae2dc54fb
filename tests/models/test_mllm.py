import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import Llava, LlavaConfig, splice_images
from mllm_jax.models.projector import Projector, ProjectorConfig
from mllm_jax.models.vit import VitConfig

VIT = VitConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=8, patch_size=4)
LLM = LlmConfig(
    vocab_size=40,
    hidden_size=24,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=12,
)
CONFIG = LlavaConfig(vision=VIT, projector=ProjectorConfig(16, 24), llm=LLM, image_token_id=39)
IMG = 39


@pytest.fixture(scope="module")
def setup():
    model = Llava(CONFIG)
    tokens = jnp.array([[1, IMG, IMG, IMG, IMG, 5, 6, 0], [1, 7, IMG, IMG, IMG, IMG, 8, 9]])
    images = jax.random.normal(jax.random.key(0), (2, 1, 8, 8, 3))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens, images)["params"])
    return model, params, tokens, images


def test_params_have_three_top_level_collections(setup):
    _, params, _, _ = setup
    assert set(params) == {"vision", "adapter", "llm"}


def test_image_features_land_on_image_tokens(setup):
    model, params, tokens, images = setup
    apply = jax.jit(model.apply, static_argnames="method")
    embeds = apply({"params": params}, tokens, images, method="embed")
    feats = apply({"params": params}, images, method="image_features")
    chex.assert_shape(feats, (2, CONFIG.tokens_per_image, 24))
    chex.assert_trees_all_close(embeds[0, 1:5], feats[0], atol=1e-6)
    chex.assert_trees_all_close(embeds[1, 2:6], feats[1], atol=1e-6)
    text = apply({"params": params}, tokens, method="embed")
    chex.assert_trees_all_close(embeds[0, 5:], text[0, 5:])


def test_several_images_per_sample_keep_their_order():
    feats = jnp.arange(4.0)[None, :, None] * jnp.ones((1, 4, 3))
    tokens = jnp.array([[5, IMG, IMG, 6, IMG, IMG]])
    out = splice_images(jnp.zeros((1, 6, 3)), tokens, IMG, feats)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 0, 2, 3])


class LlavaVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_shapes_and_jit_agree(self):
        model = Llava(CONFIG)
        tokens = jnp.array([[1, IMG, IMG, IMG, IMG, 5]])
        images = jnp.ones((1, 1, 8, 8, 3))
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens, images)["params"])
        logits, cache = self.variant(lambda p: model.apply({"params": p}, tokens, images))(params)
        chex.assert_shape(logits, (1, 6, 40))
        assert cache is None
        chex.assert_trees_all_close(
            logits, jax.jit(model.apply)({"params": params}, tokens, images)[0], atol=1e-5
        )


def test_text_before_the_image_ignores_it(setup):
    model, params, tokens, images = setup
    apply = jax.jit(model.apply)
    a = apply({"params": params}, tokens, images)[0]
    b = apply({"params": params}, tokens, images * 2.0)[0]
    chex.assert_trees_all_close(a[1, :2], b[1, :2])  # causal: tokens before the image cannot see it
    assert not np.allclose(a[1, 6:], b[1, 6:])


def test_projector_depths():
    x = jnp.ones((2, 3, 16))
    for depth in (1, 2, 3):
        p = Projector(ProjectorConfig(16, 24, depth=depth))
        variables = p.init(jax.random.key(0), x)
        assert set(variables["params"]) == {f"linear_{i}" for i in range(1, depth + 1)}
        chex.assert_shape(p.apply(variables, x), (2, 3, 24))


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="projector maps"):
        dataclasses.replace(CONFIG, vision_feature_layers=(-1, -2)).validate()
    with pytest.raises(ValueError, match="out of range"):
        dataclasses.replace(CONFIG, vision_feature_layers=(5,)).validate()
    with pytest.raises(ValueError, match="select_strategy"):
        dataclasses.replace(CONFIG, vision_feature_select_strategy="cls").validate()
