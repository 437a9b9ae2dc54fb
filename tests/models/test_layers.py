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
