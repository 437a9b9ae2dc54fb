import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoder_checks import assert_cached_decoding_matches, assert_causal, forward

from mllm_jax.models.llm import Llm, LlmConfig, init_cache, rope_inv_freq

CONFIG = LlmConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_positions=64,
)


@pytest.fixture(scope="module")
def model_and_params():
    model = Llm(CONFIG)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 32)))
    return model, nn.meta.unbox(variables["params"])


@jax.jit
def jit_forward(params, tokens, positions=None, mask=None):
    return forward(Llm(CONFIG), params, tokens, positions_BxT=positions, attention_mask_BxT=mask)


class LlmVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_jit_agree(self):
        model = Llm(CONFIG)
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 32)))["params"])
        tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 50)
        logits = self.variant(lambda p, t: forward(model, p, t))(params, tokens)
        chex.assert_shape(logits, (3, 10, 50))
        chex.assert_tree_all_finite(logits)
        chex.assert_trees_all_close(logits, jit_forward(params, tokens), atol=1e-5)


def test_no_gradient_from_future_tokens(model_and_params):
    assert_causal(*model_and_params, CONFIG.hidden_size)


def test_kv_cache_decoding_equals_full_forward(model_and_params):
    model, params = model_and_params
    assert_cached_decoding_matches(model, params, init_cache(CONFIG, 2, 16), CONFIG.vocab_size)


def test_padding_mask_hides_pad_keys(model_and_params):
    model, params = model_and_params
    tokens = jax.random.randint(jax.random.key(4), (1, 6), 0, 50)
    padded = jnp.concatenate([jnp.zeros((1, 3), tokens.dtype), tokens], axis=1)  # left padding
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = jnp.clip(jnp.arange(9) - 3, 0)[None]
    out = jit_forward(params, padded, positions, mask)
    chex.assert_trees_all_close(out[:, 3:], jit_forward(params, tokens), atol=1e-5)


def test_tied_embeddings_have_no_lm_head():
    config = dataclasses.replace(CONFIG, tie_embeddings=True)
    params = jax.eval_shape(Llm(config).init, jax.random.key(0), jnp.zeros((1, 2, 32)))["params"]
    assert "lm_head" not in params and "embed_tokens" in params


def test_rope_scaling_changes_only_low_frequencies():
    base = rope_inv_freq(dataclasses.replace(CONFIG, head_dim=64))
    scaled = rope_inv_freq(
        dataclasses.replace(
            CONFIG, head_dim=64, rope_type="llama3", rope_factor=8.0, rope_original_max_positions=64
        )
    )
    assert scaled[0] == base[0]  # highest frequency untouched
    np.testing.assert_allclose(scaled[-1], base[-1] / 8.0, rtol=1e-6)  # lowest divided by the factor
    linear = rope_inv_freq(dataclasses.replace(CONFIG, rope_type="linear", rope_factor=2.0))
    np.testing.assert_allclose(linear, rope_inv_freq(CONFIG) / 2, rtol=1e-6)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(CONFIG, num_kv_heads=3).validate()
    with pytest.raises(ValueError, match="rope_type"):
        dataclasses.replace(CONFIG, rope_type="yarn").validate()
