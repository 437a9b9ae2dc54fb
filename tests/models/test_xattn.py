import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models.idefics import Idefics, IdeficsConfig
from mllm_jax.models.llm import Llm, LlmConfig
from mllm_jax.models.perceiver import PerceiverConfig
from mllm_jax.models.vit import VitConfig
from mllm_jax.models.xattn import GatedCrossAttention, XattnConfig, expand_media_mask, latest_image_mask

XCFG = XattnConfig(hidden_size=16, intermediate_size=24, num_heads=2, head_dim=8, kv_dim=12)
LLM = LlmConfig(
    vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8
)
VIT = VitConfig(
    hidden_size=12, intermediate_size=24, num_layers=1, num_heads=2, image_size=8, patch_size=4, act="gelu"
)
CONFIG = IdeficsConfig(
    vision=VIT,
    perceiver=PerceiverConfig(embed_dim=12, num_latents=3, depth=1, num_heads=2, head_dim=6, mlp_dim=48),
    xattn=XCFG,
    llm=LLM,
    image_token_id=39,
    eod_token_id=2,
)
IMG = 39
# sample 0: text, image 0, text, image 1, text; sample 1: one image then text
TOKENS = jnp.array([[1, 5, IMG, 6, 7, IMG, 8, 9], [1, IMG, 5, 6, 7, 8, 9, 10]])
MASK = latest_image_mask(TOKENS, IMG, 2)
RNG = np.random.default_rng(0)


def normal(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def fake_init(module, *args):
    """Params as ``module.init`` would shape them, filled from numpy (alphas zero as in the default init):
    compiling a real init of a whole model costs ~10 s of CPU for these tests, for nothing they check."""

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "alpha" in name or name.endswith("['bias']"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name.endswith("['scale']"):
            return jnp.asarray(1 + 0.1 * RNG.normal(size=leaf.shape), leaf.dtype)
        return jnp.asarray(0.2 * RNG.normal(size=leaf.shape), leaf.dtype)

    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
    return jax.tree_util.tree_map_with_path(fill, shapes)


def set_alphas(params, value):
    """Every gate to ``value`` (the blocks are the identity at init)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, value) if "alpha" in jax.tree_util.keystr(path) else x, params
    )


@pytest.fixture(scope="module")
def block():
    x, media = normal(2, 5, 16), normal(2, 2, 3, 12)
    mask = jnp.array([[0, 0], [1, 0], [1, 0], [0, 1], [0, 1]], bool)[None].repeat(2, 0)
    # the one real init: it is what must make the block the identity
    key = jax.random.key(2, impl="unsafe_rbg")  # compiles faster than threefry
    params = nn.meta.unbox(jax.jit(GatedCrossAttention(XCFG).init)(key, x, media, mask)["params"])
    return x, media, mask, params


@jax.jit
def block_apply(params, x, media, mask):
    return GatedCrossAttention(XCFG).apply({"params": params}, x, media, mask)


@pytest.fixture(scope="module")
def model():
    images = normal(2, 2, 8, 8, 3)
    return fake_init(Idefics(CONFIG), TOKENS, images), images


@jax.jit
def model_apply(params, tokens, images):
    return Idefics(CONFIG).apply({"params": params}, tokens, images, image_mask_BxTxM=MASK)[0]


class XattnVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes(self):
        c = dataclasses.replace(XCFG, alpha_type="vector", alpha_init="ones", qk_layer_norms=True)
        x, media, mask = jnp.ones((2, 5, 16)), jnp.ones((2, 3, 4, 12)), jnp.ones((2, 5, 3), bool)
        params = fake_init(GatedCrossAttention(c), x, media, mask)
        out = self.variant(lambda p: GatedCrossAttention(c).apply({"params": p}, x, media, mask))(params)
        chex.assert_shape(out, (2, 5, 16))
        chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("alpha_type,shape", [("float", (1,)), ("vector", (1, 1, 16))])
def test_param_shapes(alpha_type, shape):
    c = dataclasses.replace(XCFG, alpha_type=alpha_type, qk_layer_norms=True)
    x, media, mask = jnp.ones((2, 5, 16)), jnp.ones((2, 3, 4, 12)), jnp.ones((2, 5, 3), bool)
    shapes = jax.eval_shape(GatedCrossAttention(c).init, jax.random.key(0), x, media, mask)["params"]
    params = nn.meta.unbox(shapes)
    chex.assert_shape([params["alpha_cross_attn"], params["alpha_dense"]], [shape, shape])
    chex.assert_shape(params["cross_attn"]["k_proj"]["kernel"], (12, 16))
    chex.assert_shape(params["cross_attn"]["q_layer_norm"]["scale"], (8,))
    assert set(params["mlp"]) == {"gate_proj", "up_proj", "down_proj"}


def test_zero_alphas_make_the_block_the_identity(block):
    x, media, mask, params = block
    assert not any(np.any(params[a]) for a in ("alpha_cross_attn", "alpha_dense"))
    np.testing.assert_array_equal(block_apply(params, x, media, mask), x)


def test_a_token_sees_only_its_images(block):
    x, media, mask, params = block
    params = set_alphas(params, 0.7)
    base = block_apply(params, x, media, mask)
    other = block_apply(params, x, media.at[:, 0].add(1.0), mask)  # change image 0 only
    chex.assert_trees_all_close(base[:, 3:], other[:, 3:], atol=1e-6)  # these tokens see image 1 only
    assert np.abs(np.asarray(base[:, 1:3] - other[:, 1:3])).max() > 1e-3


def test_tokens_without_images_get_no_cross_attention(block):
    x, media, mask, params = block
    params = set_alphas(params, 0.7)
    params["alpha_dense"] = jnp.zeros_like(params["alpha_dense"])
    out = block_apply(params, x, media, mask)
    np.testing.assert_array_equal(out[:, 0], x[:, 0])
    assert np.abs(np.asarray(out[:, 1:] - x[:, 1:])).max() > 1e-3
    np.testing.assert_array_equal(block_apply(params, x, None, None), x)  # no media: nothing to see


def test_no_media_is_media_nobody_may_see(block):
    x, media, mask, params = block
    params = set_alphas(params, 0.7)
    hidden = block_apply(params, x, media, jnp.zeros_like(mask))
    chex.assert_trees_all_close(block_apply(params, x, None, None), hidden, atol=1e-6)
    assert np.abs(np.asarray(hidden - x)).max() > 1e-4  # the dense branch still acts


def test_gradients_are_finite_when_rows_see_no_image(block):
    x, media, mask, params = block
    params = set_alphas(params, 0.7)
    grads = jax.grad(lambda p: block_apply(p, x, media, jnp.zeros_like(mask)).sum())(params)
    chex.assert_tree_all_finite(grads)


def test_expand_media_mask():
    mask, gate = expand_media_mask(jnp.array([[[1, 0], [0, 0]]], bool), 2)
    np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(gate, [[True, False]])


def test_latest_image_mask_follows_the_processor_rule():
    tokens = jnp.array([[5, IMG, 6, 2, 7, IMG, 8, IMG, 9]])
    got = latest_image_mask(tokens, IMG, 2, eod_token_id=2)
    # index of the visible image per token: none before the first image, none after EOD until the next
    # image, none for a third image when only two exist
    want = [-1, 0, 0, 0, -1, 1, 1, -1, -1]
    np.testing.assert_array_equal(got[0], np.array(want)[:, None] == np.arange(2))
    no_eod = latest_image_mask(tokens, IMG, 3)
    np.testing.assert_array_equal(no_eod[0].argmax(-1)[1:], [0, 0, 0, 0, 1, 1, 2, 2])


def test_params_have_three_collections(model):
    params, _ = model
    assert set(params) == {"vision", "adapter", "llm"}
    assert set(params["adapter"]) == {"perceiver", "xattn_0", "xattn_1"}


def test_with_zero_alphas_the_model_is_exactly_the_base_llm(model):
    params, images = model
    embeds = Llm(LLM).apply({"params": params["llm"]}, TOKENS, method="embed")
    base = jax.jit(lambda p, e: Llm(LLM).apply({"params": p}, e)[0])(params["llm"], embeds)
    np.testing.assert_array_equal(model_apply(params, TOKENS, images), base)


def test_text_before_an_image_ignores_it(model):
    params, images = model
    params = set_alphas(params, 0.5)
    base = model_apply(params, TOKENS, images)
    changed = model_apply(params, TOKENS, images.at[0, 1].multiply(-3.0))  # image 1 of sample 0, at token 5
    chex.assert_trees_all_close(base[0, :5], changed[0, :5], atol=1e-7)
    chex.assert_trees_all_close(base[1], changed[1], atol=1e-7)
    assert np.abs(np.asarray(base[0, 5:] - changed[0, 5:])).max() > 1e-5


def test_validate_catches_inconsistent_widths():
    CONFIG.validate()
    with pytest.raises(ValueError, match="must divide"):
        dataclasses.replace(CONFIG, cross_layer_interval=3).validate()
    with pytest.raises(ValueError, match="kv_dim"):
        dataclasses.replace(CONFIG, use_resampler=False, xattn=dataclasses.replace(XCFG, kv_dim=8)).validate()
    with pytest.raises(ValueError, match="alpha_type"):
        dataclasses.replace(XCFG, alpha_type="matrix").validate()
    with pytest.raises(ValueError, match="media_mask must be"):
        GatedCrossAttention(XCFG).init(jax.random.key(0), jnp.ones((1, 2, 16)), jnp.ones((1, 1, 3, 12)), MASK)
