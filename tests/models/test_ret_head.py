"""FROMAGe's [RET] head on LLaVA (models/retrieval.py): InfoNCE against numpy on a fixed batch, the
model's LM path is LLaVA's own, and the train step's loss adds the weighted contrastive loss."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import Llava
from mllm_jax.models.projector import ProjectorConfig
from mllm_jax.models.retrieval import (
    RetrievalConfig,
    RetrievalLlava,
    RetrievalLlavaConfig,
    info_nce,
    last_token_index,
)
from mllm_jax.models.vit import VitConfig
from mllm_jax.training import step

IMG, RET = 39, 38
CONFIG = RetrievalLlavaConfig(
    vision=VitConfig(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=8, patch_size=4
    ),
    projector=ProjectorConfig(16, 24),
    llm=LlmConfig(
        vocab_size=40, hidden_size=24, intermediate_size=32, num_layers=1, num_heads=2, head_dim=12
    ),
    image_token_id=IMG,
    retrieval=RetrievalConfig(dim=8, weight=0.5, token_id=RET),
)


def numpy_info_nce(text, image, valid, scale):
    """Symmetric InfoNCE written out row by row over the valid rows only."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    rows = np.flatnonzero(valid)
    sim = scale * unit(text[rows]) @ unit(image[rows]).T
    t2i = [np.log(np.exp(sim[i]).sum()) - sim[i, i] for i in range(len(rows))]
    i2t = [np.log(np.exp(sim[:, i]).sum()) - sim[i, i] for i in range(len(rows))]
    accuracy = np.mean([np.argmax(sim[i]) == i for i in range(len(rows))])
    return 0.5 * (np.mean(t2i) + np.mean(i2t)), accuracy


def test_info_nce_equals_numpy_on_a_fixed_batch():
    rng = np.random.default_rng(0)
    text, image = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    image[1] = text[1] + 0.1  # row 1 matches itself; row 3 (no [RET]) is no candidate for anyone
    valid = np.array([True, True, True, False, True])
    loss, accuracy = info_nce(jnp.asarray(text), jnp.asarray(image), jnp.asarray(valid), 7.0)
    want_loss, want_accuracy = numpy_info_nce(text, image, valid, 7.0)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy, want_accuracy)
    assert info_nce(jnp.asarray(text), jnp.asarray(image), jnp.zeros(5, bool), 7.0) == (0.0, 0.0)


def test_last_token_index():
    index, present = last_token_index(jnp.array([[1, RET, 5, RET, 0], [1, 2, 3, 4, 5]]), RET)
    np.testing.assert_array_equal(index, [3, 0])
    np.testing.assert_array_equal(present, [True, False])


@pytest.fixture(scope="module")
def out():
    """Everything the tests below compare, computed in one compilation."""
    model = RetrievalLlava(CONFIG)
    # rows 0 and 2: a caption, [RET], then its image (4 tokens) after it; row 1: an image and its
    # caption, no [RET]
    tokens = jnp.array(
        [[1, 5, 6, 7, RET, 2, IMG, IMG, IMG, IMG, 2], [1, IMG, IMG, IMG, IMG, 8, 9, 10, 2, 0, 0]]
        + [[1, 11, 12, 13, RET, 2, IMG, IMG, IMG, IMG, 0]]
    )
    images = jax.random.normal(jax.random.key(0), (3, 1, 8, 8, 3))
    mask = jnp.zeros(tokens.shape).at[0, 4].set(1).at[1, 5:9].set(1).at[2, 4].set(1)
    batch = dict(
        tokens=tokens,
        images=images,
        targets=jnp.roll(tokens, -1, 1),
        loss_mask=mask,
        attention_mask=tokens > 0,
    )

    # random params without compiling the initialisers (any values serve these comparisons)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(1), tokens, images)["params"]))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)

    def run(params):
        llava = {k: v for k, v in params.items() if k != "retrieval"}
        v = {"params": params}
        return dict(
            params=params,
            plain=Llava(CONFIG).apply({"params": llava}, tokens, images)[0],
            logits=model.apply(v, tokens, images)[0],
            # the [RET] rows asked alone, text only, up to their [RET]
            text=model.apply(v, tokens[::2, :5], None, method="text_embeddings"),
            image=model.apply(v, images, method="image_embeddings"),
            loss=step.lm_loss(model, params, batch, None),
            plain_loss=step.lm_loss(Llava(CONFIG), llava, batch, None),
            count=mask.sum(),
        )

    return jax.jit(run)(params)


def test_generation_path_is_llava_and_the_step_adds_the_weighted_contrastive_loss(out):
    assert set(out["params"]) == {"vision", "adapter", "llm", "retrieval"}
    chex.assert_trees_all_close(out["logits"], out["plain"], atol=1e-6)
    (loss_sum, aux), (plain_sum, plain_aux) = out["loss"], out["plain_loss"]
    count = float(out["count"])
    assert aux["count"] == plain_aux["count"] == count and "ret" not in plain_aux
    # the [RET] state does not see the image after it: the loss is the text-only embeddings'
    scale = float(np.exp(out["params"]["retrieval"]["logit_scale"]))
    text = np.asarray(out["text"])[[0, 0, 1]]  # row 1 has no [RET]
    ret, accuracy = numpy_info_nce(text, np.asarray(out["image"]), np.array([True, False, True]), scale)
    np.testing.assert_allclose(aux["ret"] / count, ret, rtol=1e-4)
    np.testing.assert_allclose(aux["ret/accuracy"] / count, accuracy)
    # the LM part is LLaVA's own (the same logits), the contrastive loss joins with weight 0.5
    np.testing.assert_allclose(loss_sum, plain_sum + 0.5 * ret * count, rtol=1e-5)


def test_packed_rows_are_refused():
    tokens, images = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 1, 8, 8, 3))
    init = functools.partial(RetrievalLlava(CONFIG).init, method="train_outputs")
    with pytest.raises(ValueError, match="packing"):  # positions come only with packed rows
        jax.eval_shape(lambda: init(jax.random.key(0), tokens, images, tokens))


def test_config_checks():
    with pytest.raises(ValueError, match="retrieval.dim"):
        dataclasses.replace(CONFIG, retrieval=RetrievalConfig(token_id=RET)).validate()
    with pytest.raises(ValueError, match="token_id"):
        dataclasses.replace(CONFIG, retrieval=RetrievalConfig(dim=8)).validate()
    CONFIG.validate()
