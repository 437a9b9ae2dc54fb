import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blip2_fixtures import random_params

from mllm_jax.models.qformer import QFormer, QFormerAdapter, QFormerConfig, self_attention_mask

CONFIG = QFormerConfig(
    hidden_size=24,
    intermediate_size=32,
    num_layers=3,
    num_heads=4,
    cross_attention_frequency=2,
    encoder_hidden_size=16,
    vocab_size=30,
    max_positions=8,
)
INSTRUCT = dataclasses.replace(CONFIG, text_input=True, text_ffn=True)
QUERIES, OUT = 5, 12


def image(seed, n=9):
    return jax.random.normal(jax.random.key(seed), (2, n, CONFIG.encoder_hidden_size))


def param_shapes(config, *args):
    model = QFormerAdapter(config, QUERIES, OUT)
    variables = jax.eval_shape(model.init, jax.random.key(0), image(0), *args)
    return jax.tree.map(lambda x: x.shape, nn.meta.unbox(variables["params"]))


@pytest.fixture(scope="module")
def instruct():
    """InstructBLIP-style adapter, its params and one jitted apply (compiled once per input shape)."""
    model = QFormerAdapter(INSTRUCT, QUERIES, OUT)
    params = random_params(model, image(0))
    return model, params, jax.jit(lambda p, img, t, m: model.apply({"params": p}, img, t, m))


class QFormerVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True)
    def test_adapter_shapes(self):
        model = QFormerAdapter(CONFIG, QUERIES, OUT)
        params = random_params(model, image(0))
        out = self.variant(lambda p, x: model.apply({"params": p}, x))(params, image(1))
        chex.assert_shape(out, (2, QUERIES, OUT))
        chex.assert_tree_all_finite(out)


def test_param_tree_follows_hf_layout():
    shapes = param_shapes(CONFIG)
    assert shapes["query_tokens"] == (1, QUERIES, 24)
    assert shapes["language_projection"]["kernel"] == (24, OUT)
    qformer = shapes["qformer"]
    assert "layernorm" in qformer and "embeddings" not in qformer  # BLIP-2: LayerNorm on the queries only
    # cross-attention in layers 0 and 2 (i % 2 == 0), K/V from the image width
    assert ["crossattention" in qformer[f"layer_{i}"] for i in range(3)] == [True, False, True]
    assert qformer["layer_0"]["crossattention"]["key"]["kernel"] == (16, 24)
    assert all("ffn_text" not in qformer[f"layer_{i}"] for i in range(3))
    # a BLIP-2 checkpoint with use_qformer_text_input carries the text FFN though it never runs
    assert "ffn_text" in param_shapes(dataclasses.replace(CONFIG, text_ffn=True))["qformer"]["layer_1"]
    # InstructBLIP: embeddings (created even when initialised without text) and a text FFN everywhere
    qformer = param_shapes(INSTRUCT)["qformer"]
    assert "layernorm" not in qformer and qformer["embeddings"]["word_embeddings"]["embedding"] == (30, 24)
    assert qformer["embeddings"]["position_embeddings"]["embedding"] == (8, 24)
    assert all("ffn_text" in qformer[f"layer_{i}"] for i in range(3))


def test_queries_read_the_image(instruct):
    model, params, apply = instruct
    tokens, mask = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)
    a, b = apply(params, image(1), tokens, mask), apply(params, image(2), tokens, mask)
    assert not np.allclose(a, b)


def test_padded_instruction_tokens_are_ignored_and_valid_ones_are_not(instruct):
    _, params, apply = instruct
    tokens = jnp.array([[3, 4, 5, 6], [7, 8, 9, 10]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    ref = apply(params, image(1), tokens, mask)
    padded_changed = tokens.at[1, 2:].set(jnp.array([20, 21]))
    chex.assert_trees_all_close(apply(params, image(1), padded_changed, mask), ref, atol=1e-6)
    valid_changed = tokens.at[1, 0].set(22)
    out = apply(params, image(1), valid_changed, mask)
    assert not np.allclose(out[1], ref[1]) and np.allclose(out[0], ref[0], atol=1e-6)


def test_masked_image_positions_are_ignored():
    model = QFormer(CONFIG)
    queries = jax.random.normal(jax.random.key(3), (2, QUERIES, 24))
    params = random_params(model, queries, image(0))
    apply = jax.jit(lambda p, img, m: model.apply({"params": p}, queries, img, None, None, m))
    img_mask = jnp.ones((2, 9)).at[:, 6:].set(0)
    ref = apply(params, image(1), img_mask)
    changed = image(1).at[:, 6:].set(5.0)
    chex.assert_trees_all_close(apply(params, changed, img_mask), ref, atol=1e-6)
    chex.assert_shape(ref, (2, QUERIES, 24))


def test_remat_gives_the_same_numbers(instruct):
    model, params, apply = instruct
    tokens, mask = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)
    remat = QFormerAdapter(INSTRUCT, QUERIES, OUT, remat="full")
    out = jax.jit(lambda p: remat.apply({"params": p}, image(1), tokens, mask))(params)
    chex.assert_trees_all_close(out, apply(params, image(1), tokens, mask), atol=1e-6)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(CONFIG, num_heads=5).validate()
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        dataclasses.replace(CONFIG, cross_attention_frequency=0).validate()
    with pytest.raises(ValueError, match="text_ffn"):
        dataclasses.replace(CONFIG, text_input=True).validate()
    with pytest.raises(ValueError, match="no text embeddings"):
        QFormer(CONFIG).init(jax.random.key(0), jnp.zeros((1, 2, 24)), image(0)[:1], jnp.ones((1, 2), int))


def test_mask_modes_follow_blip2_stage1():
    """Over [2 queries; 3 text tokens], the last text token padded."""
    valid = jnp.array([[1, 1, 1, 1, 0]])
    allowed = {m: np.asarray(self_attention_mask(m, 2, valid))[0, 0] for m in ("uni", "causal")}
    q, t = [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]  # rows: who a query / a text token may attend to
    np.testing.assert_array_equal(allowed["uni"], [q, q, t, t, t])
    np.testing.assert_array_equal(
        allowed["causal"], [q, q, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    )
    bi = np.asarray(self_attention_mask("bi", 2, valid))  # InstructBLIP's: unchanged, keys only
    assert bi.shape == (1, 1, 1, 5) and bi.tolist() == [[[[True] * 4 + [False]]]]
    # one mode per example: several passes in one batch
    mixed = np.asarray(self_attention_mask(("uni", "causal"), 2, jnp.ones((2, 5))))
    np.testing.assert_array_equal(
        mixed[1, 0], np.asarray(self_attention_mask("causal", 2, jnp.ones((1, 5))))[0, 0]
    )
    np.testing.assert_array_equal(
        mixed[0, 0], np.asarray(self_attention_mask("uni", 2, jnp.ones((1, 5))))[0, 0]
    )
    with pytest.raises(ValueError, match="unknown Q-Former mask mode"):
        self_attention_mask("full", 2, valid)
    with pytest.raises(ValueError, match="3 mask modes for a batch of 2"):
        self_attention_mask(("uni",) * 3, 2, jnp.ones((2, 5)))


def test_stage1_heads_need_the_text_ffn():
    adapter = QFormerAdapter(CONFIG, QUERIES, OUT, itc_embed_dim=8)
    with pytest.raises(ValueError, match="text_ffn=True"):
        jax.eval_shape(adapter.init, jax.random.key(0), image(0))
    with pytest.raises(ValueError, match="itc_embed_dim=0"):
        QFormerAdapter(CONFIG, QUERIES, OUT).apply(
            {"params": {"query_tokens": jnp.zeros((1, QUERIES, 24))}},
            None,
            jnp.ones((2, 3), int),
            method="encode",
        )
