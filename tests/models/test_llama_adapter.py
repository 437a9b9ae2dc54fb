"""LLaMA-Adapter's module: with the gates at zero it is the base LLaMA exactly (bit for bit), the image
and the prompts act only through the gates, and cached decoding with the image as media (how
``generate`` drives it) gives the logits of one full forward (``generate`` itself runs on a trained
model in tests/training/test_train_llama_adapter.py)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mllm_jax.models.llama_adapter import LlamaAdapter, LlamaAdapterConfig
from mllm_jax.models.llm import Llm, LlmConfig, init_cache
from mllm_jax.models.vit import VitConfig

IMAGE_TOKEN = 5
CONFIG = LlamaAdapterConfig(
    VitConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, image_size=16, patch_size=8),
    LlmConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_positions=128,
    ),  # fmt: skip
    adapter_len=3,
    adapter_layers=2,  # layer 0 stays a plain LLaMA layer
    image_token_id=IMAGE_TOKEN,
)
TOKENS = np.array([[1, IMAGE_TOKEN, 7, 8, 9, 10, 11], [1, IMAGE_TOKEN, 3, 4, 12, 13, 14]], np.int32)


@pytest.fixture(scope="module")
def setup():
    model = LlamaAdapter(CONFIG)
    images = jax.random.normal(jax.random.key(1), (2, 1, 16, 16, 3))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), TOKENS, images)["params"])
    forward = jax.jit(lambda p, t, im: model.apply({"params": p}, t, im)[0])
    return model, params, images, forward


def with_gates(params, value):
    adapter = dict(params["adapter"], gates=jnp.full_like(params["adapter"]["gates"], value))
    return {**params, "adapter": adapter}


def test_params_are_the_llama_tree_plus_the_adapter(setup):
    model, params, _, _ = setup
    assert set(params) == {"vision", "adapter", "llm"}
    llm = Llm(CONFIG.llm)
    base = jax.eval_shape(lambda: nn.meta.unbox(llm.init(jax.random.key(0), jnp.zeros((1, 4, 32)))["params"]))
    chex.assert_trees_all_equal_shapes(params["llm"], base)
    shapes = jax.tree.map(jnp.shape, params["adapter"])
    assert shapes["prompts"] == (2, 3, 32) and shapes["gates"] == (2, 4)
    assert np.all(np.asarray(params["adapter"]["gates"]) == 0)  # zero-initialised


def test_zero_gates_give_the_base_llama_exactly(setup):
    model, params, images, forward = setup
    llm = Llm(CONFIG.llm)
    base = jax.jit(lambda p, t: llm.apply({"params": p}, llm.apply({"params": p}, t, method="embed"))[0])
    expected = np.asarray(base(params["llm"], TOKENS))
    np.testing.assert_array_equal(np.asarray(forward(params, TOKENS, images)), expected)
    # whatever the image and the prompts hold
    other = {**params, "adapter": dict(params["adapter"], prompts=params["adapter"]["prompts"] * 3 + 1)}
    np.testing.assert_array_equal(np.asarray(forward(other, TOKENS, -images)), expected)


def test_open_gates_let_the_image_in(setup):
    _, params, images, forward = setup
    opened = with_gates(params, 0.5)
    a = np.asarray(forward(opened, TOKENS, images))
    b = np.asarray(forward(opened, TOKENS, images[::-1]))
    assert not np.allclose(a, b, atol=1e-4)  # each sample reads its own image
    # no image token in a row: that row does not see the image (its prompts alone)
    text_only = TOKENS.copy()
    text_only[:, 1] = 6
    c = np.asarray(forward(opened, text_only, images))
    d = np.asarray(forward(opened, text_only, images[::-1]))
    np.testing.assert_allclose(c, d, atol=1e-6)


def test_two_images_per_sample_are_refused(setup):
    model, params, images, _ = setup
    with pytest.raises(ValueError, match="one image per sample"):
        model.apply({"params": params}, TOKENS, jnp.concatenate([images, images], axis=1))


def test_cached_decoding_with_media_matches_the_full_forward(setup):
    model, params, images, forward = setup
    opened = with_gates(params, 0.7)
    full = np.asarray(forward(opened, TOKENS, images))

    @jax.jit
    def step(p, tokens, media, mask, cache, index_B):
        embeds = model.apply({"params": p}, tokens, method="embed")
        positions = index_B[:, None] + jnp.arange(tokens.shape[1])
        return model.apply(
            {"params": p}, embeds, positions, None, cache, index_B, media, mask, method="decode"
        )

    _, (media, mask) = model.apply({"params": opened}, TOKENS, images, method="inputs")
    cache = init_cache(CONFIG.llm, 2, 8)
    logits, cache = step(opened, TOKENS[:, :4], media, mask[:, :4], cache, jnp.zeros((2,), jnp.int32))
    steps = [logits]
    for i in range(4, 7):  # each step sees only its own row of the mask, as in generate
        logits, cache = step(
            opened, TOKENS[:, i : i + 1], media, mask[:, i : i + 1], cache, jnp.full((2,), i)
        )
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_pooling_is_class_mean_max_or_concatenated(setup):
    _, params, images, _ = setup
    with pytest.raises(ValueError, match="pooling"):
        dataclasses.replace(CONFIG, pooling="median").validate()
    mean = LlamaAdapter(dataclasses.replace(CONFIG, pooling="mean"))
    shape = jax.eval_shape(lambda p: mean.apply({"params": p}, images, method="media"), params)
    assert shape.shape == (2, 1, 32)  # the same params, one feature per image
    concat = LlamaAdapter(dataclasses.replace(CONFIG, pooling="concat"))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(concat.init(jax.random.key(0), TOKENS, images)["params"]))
    assert shapes["adapter"]["visual_proj"]["kernel"].shape == (2 * 32, 32)  # class token and mean
    both = LlamaAdapter(dataclasses.replace(CONFIG, pooling="concat_max"))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(both.init(jax.random.key(0), TOKENS, images)["params"]))
    assert shapes["adapter"]["visual_proj"]["kernel"].shape == (3 * 32, 32)  # class token, mean and max
