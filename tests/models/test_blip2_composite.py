import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blip2_fixtures import random_params, tiny_blip2_config

from mllm_jax.families.base import config_from_dict
from mllm_jax.models.blip2 import Blip2, Blip2Config
from mllm_jax.models.eva import EvaTower
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.opt import OptConfig
from mllm_jax.models.scan import stack_layers

IMAGE_ID = 49
CONFIG = tiny_blip2_config(num_layers=2, vocab_size=50, image_token_id=IMAGE_ID)
LLAMA = dataclasses.replace(
    CONFIG,
    llm=LlmConfig(
        vocab_size=50, hidden_size=24, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=12
    ),
    llm_type="",
)
TOKENS = jnp.array([[IMAGE_ID] * 3 + [1, 5, 6, 7], [IMAGE_ID] * 3 + [1, 8, 9, 10]])


def images(seed=0, n=1):
    return jax.random.normal(jax.random.key(seed), (2, n, 8, 8, 3))


@pytest.fixture(scope="module")
def model_and_params():
    model = Blip2(CONFIG)
    return model, random_params(model, TOKENS, images())


def test_params_have_the_three_collections(model_and_params):
    _, params = model_and_params
    assert sorted(params) == ["adapter", "llm", "vision"]
    assert sorted(params["adapter"]) == ["language_projection", "qformer", "query_tokens"]
    assert params["adapter"]["language_projection"]["kernel"].shape == (16, 24)
    assert params["vision"]["position_embedding"].shape == (1, 5, 16)  # [1, N + 1, D] as HF


def test_query_outputs_replace_the_image_tokens(model_and_params):
    model, params = model_and_params
    # two images per sample: each one's num_query_tokens outputs land on its <image> tokens, in order
    tokens = jnp.concatenate([jnp.full((2, 3), IMAGE_ID), TOKENS], axis=1)
    embed = jax.jit(lambda p, i: model.apply({"params": p}, tokens, i, method="embed"))
    a = embed(params, jnp.concatenate([images(1), images(2)], axis=1))
    b = embed(params, jnp.concatenate([images(2), images(1)], axis=1))
    chex.assert_shape(a, (2, 10, 24))
    text_only = model.apply({"params": params}, tokens, method="embed")
    np.testing.assert_array_equal(a[:, 6:], text_only[:, 6:])  # the text is untouched
    np.testing.assert_allclose(a[:, :3], b[:, 3:6], atol=1e-6)
    np.testing.assert_allclose(a[:, 3:6], b[:, :3], atol=1e-6)
    assert not np.allclose(a[:, :3], a[:, 3:6])  # the image tokens carry the image


def test_scan_layers_gives_the_same_numbers(model_and_params):
    _, params = model_and_params
    stacked = stack_layers(params)
    # the Q-Former's layers differ from each other: they must stay unstacked
    assert (
        "layer_0" in stacked["adapter"]["qformer"]
        and "layers" in stacked["llm"]
        and "layers" in stacked["vision"]
    )
    pixels = images(1)[:, 0]
    run = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, pixels))(p)  # noqa: E731
    hidden, last = run(EvaTower(CONFIG.vision), params["vision"])
    hidden_scan, last_scan = run(EvaTower(CONFIG.vision, scan_layers=True, remat="full"), stacked["vision"])
    assert len(hidden_scan) == len(hidden) == CONFIG.vision.num_layers + 1
    chex.assert_trees_all_close((hidden_scan, last_scan), (hidden, last), atol=1e-5)


@pytest.mark.parametrize("config", [CONFIG, LLAMA], ids=["opt", "llama"])
def test_config_round_trips_through_a_dict(config):
    config.validate()
    assert config.llm_type == ("opt" if isinstance(config.llm, OptConfig) else "llm")
    assert config_from_dict(Blip2Config, dataclasses.asdict(config)) == config


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        dataclasses.replace(
            CONFIG, qformer=dataclasses.replace(CONFIG.qformer, encoder_hidden_size=8)
        ).validate()
    with pytest.raises(ValueError, match="word_embed_proj_dim"):
        dataclasses.replace(CONFIG, llm=dataclasses.replace(CONFIG.llm, word_embed_proj_dim=8)).validate()
    with pytest.raises(ValueError, match="does not match"):
        Blip2Config(llm=LlmConfig(), llm_type="opt")
