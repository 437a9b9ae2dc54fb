import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models.perceiver import Perceiver, PerceiverConfig

CONFIG = PerceiverConfig(embed_dim=16, num_latents=3, depth=2, num_heads=2, head_dim=8, mlp_dim=32)


def init(config, x):
    key = jax.random.key(0, impl="unsafe_rbg")  # compiles much faster than threefry on CPU
    return nn.meta.unbox(jax.jit(Perceiver(config).init)(key, x)["params"])


@pytest.fixture(scope="module")
def setup():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 16)), jnp.float32)
    return x, init(CONFIG, x)


@jax.jit
def apply(params, x):
    return Perceiver(CONFIG).apply({"params": params}, x)


class PerceiverVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes(self):
        x = jnp.ones((2, 7, 16))
        params = jax.tree.map(
            lambda s: jnp.full(s.shape, 0.1, s.dtype), jax.eval_shape(lambda: init(CONFIG, x))
        )
        out = self.variant(lambda p, x: Perceiver(CONFIG).apply({"params": p}, x))(params, x)
        chex.assert_shape(out, (2, 3, 16))
        chex.assert_tree_all_finite(out)


def test_param_tree_mirrors_idefics(setup):
    _, params = setup
    assert set(params) == {"latents", "blocks_0", "blocks_1", "layer_norm"}
    chex.assert_shape(params["latents"], (3, 16))
    attn, mlp = params["blocks_0"]["attn"], params["blocks_0"]["mlp"]
    assert set(attn) == {
        "context_layer_norm",
        "latents_layer_norm",
        "q_proj",
        "k_proj",
        "v_proj",
        "output_proj",
    }
    assert all(set(attn[p]) == {"kernel"} for p in ("q_proj", "k_proj", "v_proj", "output_proj"))  # no biases
    chex.assert_shape(attn["q_proj"]["kernel"], (16, 16))
    assert set(mlp) == {"ln", "fc", "c_proj"}
    chex.assert_shape(mlp["fc"]["kernel"], (16, 32))


def test_init_scales_change_the_numbers_not_the_tree(setup):
    # latents_init_std and qk_init_std only set the starting weights: the tree (and so the HF export) is
    # the same, and q/k/latents start at the asked scale while v and the rest keep N(0, 0.02)
    x, params = setup
    config = dataclasses.replace(CONFIG, latents_init_std=0.05, qk_init_std=0.5, context_norm_init=2.0)
    scaled = init(config, x)
    chex.assert_trees_all_equal_shapes(params, scaled)
    attn = scaled["blocks_1"]["attn"]
    std = lambda a: float(np.std(np.asarray(a)))  # noqa: E731
    assert 0.4 < std(attn["q_proj"]["kernel"]) < 0.6 and 0.4 < std(attn["k_proj"]["kernel"]) < 0.6
    assert 0.03 < std(scaled["latents"]) < 0.07
    assert 0.015 < std(attn["v_proj"]["kernel"]) < 0.025
    assert 0.015 < std(params["blocks_1"]["attn"]["q_proj"]["kernel"]) < 0.025  # the default
    np.testing.assert_array_equal(attn["context_layer_norm"]["scale"], 2.0)
    np.testing.assert_array_equal(attn["latents_layer_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["blocks_1"]["attn"]["context_layer_norm"]["scale"], 1.0)
    with pytest.raises(ValueError, match="qk_init_std"):
        dataclasses.replace(CONFIG, qk_init_std=-1.0).validate()
    with pytest.raises(ValueError, match="context_norm_init"):
        dataclasses.replace(CONFIG, context_norm_init=0.0).validate()


def test_qk_layer_norms_are_per_head():
    params = jax.eval_shape(
        lambda: init(dataclasses.replace(CONFIG, qk_layer_norms=True), jnp.ones((1, 4, 16)))
    )
    attn = params["blocks_0"]["attn"]
    chex.assert_shape([attn["q_layer_norm"]["scale"], attn["k_layer_norm"]["bias"]], [(8,), (8,)])


def test_context_order_does_not_matter(setup):
    # no positions anywhere: the resampler sees a set of features
    x, params = setup
    perm = np.random.default_rng(0).permutation(7)
    chex.assert_trees_all_close(apply(params, x), apply(params, x[:, perm]), atol=1e-5)


def test_samples_are_resampled_independently(setup):
    x, params = setup
    y = x.at[1].set(-x[1])
    out_x, out_y = apply(params, x), apply(params, y)
    chex.assert_trees_all_close(out_x[0], out_y[0], atol=1e-6)
    assert np.abs(np.asarray(out_x[1] - out_y[1])).max() > 1e-3


def test_frames_without_time_embeddings_are_one_context(setup):
    _, params = setup
    frames = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 5, 16)), jnp.float32)
    chex.assert_trees_all_close(apply(params, frames), apply(params, frames.reshape(2, 15, 16)), atol=1e-6)


def test_frame_embeddings_make_frame_order_matter(setup):
    config = dataclasses.replace(CONFIG, max_frames=4)
    frames = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 5, 16)), jnp.float32)
    _, params = setup
    shapes = jax.eval_shape(lambda: init(config, frames))
    chex.assert_shape(shapes["frame_embedding"], (4, 16))
    params = {
        **params,
        "frame_embedding": jnp.asarray(np.random.default_rng(4).normal(size=(4, 16)), jnp.float32),
    }
    fn = jax.jit(lambda p, x: Perceiver(config).apply({"params": p}, x))
    out = fn(params, frames)
    chex.assert_shape(out, (2, 3, 16))
    assert np.abs(np.asarray(out - fn(params, frames[:, ::-1]))).max() > 1e-5  # exactly 0 without
    with pytest.raises(ValueError, match="at most 4"):
        fn(params, jnp.ones((1, 5, 2, 16)))


def test_validate_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_latents"):
        dataclasses.replace(CONFIG, num_latents=0).validate()
    with pytest.raises(ValueError, match="unknown activation"):
        dataclasses.replace(CONFIG, act="nope").validate()
    with pytest.raises(ValueError, match="expects"):
        apply(init(CONFIG, jnp.ones((1, 2, 16))), jnp.ones((1, 2, 8)))
