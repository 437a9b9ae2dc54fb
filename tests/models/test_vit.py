import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mllm_jax.models.vit import VisionTower, VitConfig, select_features

CLIP = VitConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=16, patch_size=4)
SIGLIP = dataclasses.replace(
    CLIP,
    num_layers=2,
    act="gelu_pytorch_tanh",
    class_token=False,
    pre_norm=False,
    patch_bias=True,
    pooling_head=True,
)


class VitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.filterwarnings("ignore")
    def test_clip_and_siglip_shapes(self):
        pixels = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
        for config, tokens in ((CLIP, 17), (SIGLIP, 16)):
            model = VisionTower(config)
            params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), pixels)["params"])
            hidden, pooled = self.variant(lambda p, x, m=model: m.apply({"params": p}, x))(params, pixels)
            assert len(hidden) == config.num_layers + 1
            for h in hidden:
                chex.assert_shape(h, (2, tokens, 32))
            chex.assert_shape(pooled, (2, 32))
            assert ("class_embedding" in params) == config.class_token
            assert ("head" in params) == config.pooling_head


def test_images_are_independent():
    model = VisionTower(CLIP)
    pixels = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), pixels)["params"])
    apply = jax.jit(model.apply)
    both = apply({"params": params}, pixels)[0][-1]
    one = apply({"params": params}, pixels[1:])[0][-1]
    chex.assert_trees_all_close(both[1:], one, atol=1e-5)


def test_feature_selection_drops_cls_and_concatenates():
    hidden = tuple(jnp.full((1, 5, 2), float(i)) for i in range(4))
    out = select_features(hidden, (-2, -1), drop_cls=True)
    chex.assert_shape(out, (1, 4, 4))
    assert float(out[0, 0, 0]) == 2.0 and float(out[0, 0, 3]) == 3.0
    chex.assert_shape(select_features(hidden, (-2,), drop_cls=False), (1, 5, 2))


def test_wrong_image_size_has_clear_error():
    model = VisionTower(CLIP)
    with pytest.raises(ValueError, match="expects 16x16 images"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 20, 20, 3)))


def test_position_init_std_sets_the_start_not_the_tree():
    # an init knob only (tiny Flamingo): the same tree, so HF parity and export are unchanged
    pixels, key = jnp.zeros((1, 16, 16, 3)), jax.random.key(1, impl="unsafe_rbg")  # rbg compiles faster
    shapes = lambda c: jax.eval_shape(VisionTower(c).init, key, pixels)["params"]  # noqa: E731
    scaled = dataclasses.replace(CLIP, position_init_std=0.5)
    chex.assert_trees_all_equal_shapes(shapes(CLIP), shapes(scaled))
    params = nn.meta.unbox(jax.jit(VisionTower(scaled).init)(key, pixels)["params"])
    assert 0.4 < float(jnp.std(params["position_embedding"])) < 0.6
    assert 0.015 < float(jnp.std(params["class_embedding"])) < 0.025  # the rest keeps HF's 0.02
    with pytest.raises(ValueError, match="position_init_std"):
        dataclasses.replace(CLIP, position_init_std=-1.0).validate()
