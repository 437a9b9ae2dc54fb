"""The splash attention kernel (Pallas, TPU) against XLA attention, run in the Pallas interpreter on CPU:
causal with key padding on either side, grouped-query heads, lengths that are not whole blocks, a
sliding window, gradients, and a whole LLM forward with the kernel as the model's field."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models import layers, splash
from mllm_jax.models.llm import Llm, LlmConfig

B, T, N, K, H = 2, 40, 4, 2, 16
# row 0 left-padded (3 pads), row 1 right-padded (5 pads): as generate's and the pipeline's batches are
KEY_VALID = np.ones((B, T), bool)
KEY_VALID[0, :3] = False
KEY_VALID[1, -5:] = False


def qkv(t=T, s=T, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k1, (B, t, N, H)),
        jax.random.normal(k2, (B, s, K, H)),
        jax.random.normal(k3, (B, s, K, H)),
    )


def xla(q, k, v, mask=None):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def interpreted(q, k, v, key_valid=None, causal=True, sliding_window=None):
    """The kernel in the Pallas interpreter, jitted (op by op it is several times slower)."""
    fn = lambda *a: splash.splash_attention(*a, causal=causal, sliding_window=sliding_window, interpret=True)  # noqa: E731
    return jax.jit(fn)(q, k, v, key_valid)


def causal(key_valid=None, window=None):
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    return layers.causal_mask(idx, idx, None if key_valid is None else jnp.asarray(key_valid), window)


def test_causal_with_key_padding_and_grouped_heads_matches_xla_with_gradients():
    q, k, v = qkv()
    key_valid = jnp.asarray(KEY_VALID)
    # padding queries' rows are unspecified (nothing reads them): the loss weighs only real ones
    weight = jnp.asarray(KEY_VALID, jnp.float32)[:, :, None, None]

    def out_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out[KEY_VALID], vjp(jnp.cos(out) * weight)  # the gradients of sum(sin(out) * weight)

    got = out_and_grads(lambda *a: interpreted(*a, key_valid))
    want = out_and_grads(lambda *a: xla(*a, causal(KEY_VALID)))
    chex.assert_trees_all_close(got, want, atol=1e-5)


def test_full_attention_of_a_length_that_is_not_whole_blocks():
    # a vision tower's 50 tokens (patches + class token): padded to 128 inside, the padding never attended
    q, k, v = qkv(t=50, s=50, seed=2)
    got = interpreted(q, k, v, causal=False)
    chex.assert_trees_all_close(got, xla(q, k, v), atol=1e-5)


def test_sliding_window_matches_causal_mask():
    q, k, v = qkv(seed=3)
    got = interpreted(q, k, v, sliding_window=7)
    chex.assert_trees_all_close(got, xla(q, k, v, causal(window=7)), atol=1e-5)


def test_block_sizes_divide_the_padded_length():
    assert [splash.block_size(n) for n in (128, 256, 384, 512, 640, 2048)] == [128, 256, 128, 512, 128, 512]


def test_llm_forward_with_the_splash_kernel_matches_xla():
    config = LlmConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
    )
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, 64)
    mask = jnp.asarray(KEY_VALID, jnp.int32)
    params = Llm(config).init(jax.random.key(5), jnp.zeros((1, 4, 32)))
    embeds = Llm(config).apply(params, tokens, method=Llm.embed)

    def forward(kernel):  # the kernel is the model's own field: same params, another module
        return jax.jit(Llm(config, attention=kernel).apply)(params, embeds, attention_mask_BxT=mask)[0]

    got = forward(layers.AttentionKernel("splash", interpret=True))  # the Pallas interpreter on CPU
    want = forward(layers.AttentionKernel())
    chex.assert_trees_all_close(got[KEY_VALID], want[KEY_VALID], atol=1e-5)


def test_splash_is_refused_off_tpu():
    with pytest.raises(ValueError, match="'splash' is a TPU kernel .* compiles for cpu: use 'xla'"):
        layers.attention_kernel("splash")
    with pytest.raises(ValueError, match="attention 'flash': one of"):
        layers.attention_kernel("flash")
    # a kernel built around attention_kernel is refused when a step is traced with it
    q, k, v = qkv()
    with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
        layers.attention(q, k, v, kernel=layers.AttentionKernel("splash"))
    # a plan for a TPU slice compiles for it from this CPU host
    assert layers.attention_kernel("splash", platform="tpu") == layers.AttentionKernel("splash", "tpu")
