import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models import layers


def test_rmsnorm_matches_formula():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    params = {"scale": jnp.linspace(0.5, 1.5, 8)}
    y = layers.RMSNorm(1e-6).apply({"params": params}, x)
    want = (
        np.asarray(x)
        / np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True) + 1e-6)
        * np.asarray(params["scale"])
    )
    chex.assert_trees_all_close(y, want, atol=1e-5)


def test_layernorm_matches_formula():
    x = jax.random.normal(jax.random.key(1), (4, 8)) * 3 + 1
    params = {"scale": jnp.full((8,), 2.0), "bias": jnp.full((8,), 0.5)}
    y = layers.LayerNorm(1e-5).apply({"params": params}, x)
    xn = np.asarray(x)
    want = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5) * 2.0 + 0.5
    chex.assert_trees_all_close(y, want, atol=1e-5)


def test_activation_table_knows_hf_names_and_rejects_others():
    x = jnp.linspace(-3, 3, 7)
    chex.assert_trees_all_close(layers.activation("quick_gelu")(x), x * jax.nn.sigmoid(1.702 * x))
    assert not np.allclose(layers.activation("gelu")(x), layers.activation("gelu_pytorch_tanh")(x), atol=1e-6)
    with pytest.raises(ValueError, match="unknown activation"):
        layers.activation("geluu")


def test_causal_mask_with_window_and_padding():
    idx = jnp.arange(5)[None]
    mask = layers.causal_mask(idx, idx, jnp.array([[1, 1, 1, 1, 0]]), sliding_window=2)[0, 0]
    want = np.zeros((5, 5), bool)
    for q in range(5):
        for k in range(5):
            want[q, k] = k <= q and q - k < 2 and k < 4
    np.testing.assert_array_equal(mask, want)


def test_dense_params_carry_logical_axes():
    variables = layers.Dense(6, ("embed", "mlp")).init(jax.random.key(0), jnp.ones((1, 4)))
    assert variables["params"]["kernel"].names == ("embed", "mlp")
    assert variables["params"]["bias"].names == ("mlp",)


def test_dense_on_a_sequence_equals_the_matmul():
    x = jax.random.normal(jax.random.key(2), (2, 3, 4))
    variables = layers.Dense(6, ("embed", "mlp")).init(jax.random.key(0), x)
    p = variables["params"]
    y = layers.Dense(6, ("embed", "mlp")).apply(variables, x)
    chex.assert_shape(y, (2, 3, 6))
    chex.assert_trees_all_close(
        y, np.einsum("bti,io->bto", x, p["kernel"].value) + p["bias"].value, atol=1e-6
    )


@pytest.mark.parametrize(
    "mask_shape", [None, (2, 1, 5, 7), (2, 6, 5, 7), (1, 1, 5, 7), (2, 1, 1, 7), (2, 6, 1, 7)]
)
def test_xla_attention_equals_jax_reference_with_gqa_and_masks(mask_shape):
    """Our XLA layout (heads first, query groups folded into rows) is jax.nn.dot_product_attention's
    arithmetic: outputs in f32 and bf16, and gradients, also where a query has no key left."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)  # 6 query heads over 2 kv heads
    k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32) for _ in range(2))
    mask = None
    if mask_shape is not None:
        mask = jnp.asarray(rng.random(mask_shape) > 0.4)
        if mask_shape[2] > 1:
            mask = mask.at[..., 0, :].set(False)  # query 0 sees no key
    for dtype in (jnp.float32, jnp.bfloat16):
        ours = layers.attention(q, k, v, mask, dtype)
        ref = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask)
        assert ours.dtype == dtype
        chex.assert_trees_all_close(ours.astype(jnp.float32), ref.astype(jnp.float32), atol=1e-6)

    def grads(fn):
        return jax.grad(lambda q, k, v: (fn(q, k, v) * jnp.arange(8.0)).sum(), argnums=(0, 1, 2))(q, k, v)

    chex.assert_trees_all_close(
        grads(lambda q, k, v: layers.attention(q, k, v, mask)),
        grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)),
        atol=2e-6,
    )
