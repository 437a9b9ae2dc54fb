import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from blip2_fixtures import random_params
from decoder_checks import assert_cached_decoding_matches, assert_causal, forward

from mllm_jax.models import llm
from mllm_jax.models.opt import Opt, OptConfig, init_cache
from mllm_jax.models.scan import stack_layers

CONFIG = OptConfig(
    vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, max_positions=64
)
PROJ = dataclasses.replace(CONFIG, word_embed_proj_dim=16, pre_norm=False)  # opt-350m's shape


def init(config, **kw):
    model = Opt(config, **kw)
    return model, random_params(model, jnp.zeros((1, 4, config.embed_dim)))


def param_shapes(config):
    model = Opt(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, config.embed_dim)))
    return jax.tree.map(lambda x: x.shape, nn.meta.unbox(variables["params"]))


@pytest.fixture(scope="module")
def model_and_params():
    return init(CONFIG)


@jax.jit
def jit_forward(params, tokens, positions=None, mask=None):
    return forward(Opt(CONFIG), params, tokens, positions_BxT=positions, attention_mask_BxT=mask)


class OptVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True)
    def test_shapes(self):
        model, params = init(PROJ)
        tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 50)
        embeds = self.variant(lambda p, t: model.apply({"params": p}, t, method="embed"))(params, tokens)
        chex.assert_shape(embeds, (3, 10, PROJ.embed_dim))  # the narrow word-embedding width
        logits = self.variant(lambda p, t: forward(model, p, t))(params, tokens)
        chex.assert_shape(logits, (3, 10, 50))
        chex.assert_tree_all_finite(logits)


def test_param_tree_follows_the_config():
    shapes = param_shapes(PROJ)
    assert shapes["embed_tokens"]["embedding"] == (50, 16)
    assert shapes["embed_positions"]["embedding"] == (64 + 2, 32)  # OPT's offset of 2
    assert shapes["project_in"]["kernel"] == (16, 32) and shapes["project_out"]["kernel"] == (32, 16)
    assert "final_layer_norm" not in shapes and "lm_head" not in shapes  # post-LN: no final norm; tied
    shapes = param_shapes(dataclasses.replace(CONFIG, tie_embeddings=False, bias=False))
    assert shapes["lm_head"]["kernel"] == (32, 50) and "final_layer_norm" in shapes
    assert "bias" not in shapes["layers_0"]["fc1"] and "bias" not in shapes["layers_0"]["self_attn"]["q_proj"]


def test_no_gradient_from_future_tokens(model_and_params):
    assert_causal(*model_and_params, CONFIG.hidden_size)


@pytest.mark.parametrize("config", [CONFIG, PROJ], ids=["pre_ln", "proj_post_ln"])
def test_kv_cache_decoding_equals_full_forward(config):
    model, params = init(config)
    # pre_ln passes positions explicitly; proj_post_ln leaves them to default to the cache offset.
    assert_cached_decoding_matches(
        model, params, init_cache(config, 2, 16), 50, explicit_positions=config is CONFIG
    )


def test_left_padding_takes_positions_from_the_mask(model_and_params):
    _, params = model_and_params
    tokens = jax.random.randint(jax.random.key(5), (1, 6), 0, 50)
    padded = jnp.concatenate([jnp.zeros((1, 3), tokens.dtype), tokens], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = jit_forward(params, padded, None, mask)  # positions from cumsum(mask), as HF does
    chex.assert_trees_all_close(out[:, 3:], jit_forward(params, tokens), atol=1e-5)


def test_scan_layers_and_remat_give_the_same_numbers(model_and_params):
    _, params = model_and_params
    tokens = jax.random.randint(jax.random.key(6), (2, 7), 0, 50)
    ref = jit_forward(params, tokens)
    scan = Opt(CONFIG, scan_layers=True, remat="full")

    @jax.jit
    def scanned(params, tokens, cache):  # a stacked cache, as generate makes for scan_layers models
        embeds = scan.apply({"params": params}, tokens, method="embed")
        no_cache = scan.apply({"params": params}, embeds)[0]
        return no_cache, scan.apply({"params": params}, embeds, None, None, cache, jnp.zeros(2, int))[0]

    cache = init_cache(CONFIG, 2, 8, stacked=True)
    chex.assert_shape(cache[0], (2, 2, 8, 4, 8))
    no_cache, with_cache = scanned(stack_layers(params), tokens, cache)
    chex.assert_trees_all_close(no_cache, ref, atol=1e-5)
    chex.assert_trees_all_close(with_cache, ref, atol=1e-5)


def test_cache_geometry_is_llm_compatible():
    # generate.py builds caches with llm.init_cache(model.config.llm, ...): an OptConfig must work there.
    a, b = init_cache(CONFIG, 2, 8), llm.init_cache(CONFIG, 2, 8)
    assert len(a) == CONFIG.num_layers and jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)
    chex.assert_shape(a[0][0], (2, 8, CONFIG.num_kv_heads, CONFIG.head_dim))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(CONFIG, num_heads=5).validate()
    with pytest.raises(ValueError, match="activation"):
        dataclasses.replace(CONFIG, act="nope").validate()
