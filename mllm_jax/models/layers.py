"""Shared building blocks: activations, normalisation, dense layers and attention.

Every parameter carries *logical* axis names (see ``mllm_jax.sharding``); the mapping of those
names onto the device mesh lives in one table there, never in the modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` names -> functions. GELU variants matter for parity: "gelu" is the exact erf form.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# Rematerialisation policies by name (as MaxText names them): what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
}


def check_remat(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {sorted(REMAT_POLICIES)}")
    return policy


def maybe_remat(module_cls, policy: str):
    """``module_cls`` wrapped in ``nn.remat`` with the named policy (param names are unchanged)."""
    if check_remat(policy) == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=True)


def constrain(x, axes: Sequence[str | None]):
    """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


def default_kernel_init(in_features: int):
    # HF-style N(0, 0.02) is what the reference models use; scaled by fan-in for tiny from-scratch models.
    return nn.initializers.normal(stddev=min(0.02, 1.0 / math.sqrt(max(in_features, 1))))


class Dense(nn.Module):
    """``x @ kernel + bias`` with kernel ``[in, out]`` (HF Linear is ``[out, in]``) and logical axes."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(default_kernel_init(in_features), self.axes),
            (in_features, self.features),
            self.param_dtype,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm computed in f32 (as torch does for f32 and as we want for bf16 stability)."""

    eps: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,), self.param_dtype
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in f32, cast back, then scale (HF's exact order)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


# jax.nn.dot_product_attention's `implementation`: None lets XLA choose; "cudnn" asks for cuDNN's fused
# flash attention on NVIDIA GPUs (bf16/f16 inputs only). Set by the benchmark's --attention flag.
ATTENTION_IMPLEMENTATION: dict = {"name": None}


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxNxTxS=None, dtype=jnp.float32):
    """Scaled dot-product attention through ``jax.nn.dot_product_attention``.

    Grouped-query attention is native (N query heads, K kv heads, N % K == 0). ``mask`` is boolean,
    True where a query may attend; broadcastable to ``[B, N, T, S]``. Softmax runs in f32.
    """
    impl = ATTENTION_IMPLEMENTATION["name"]
    if impl is not None and dtype == jnp.float32:
        impl = None  # the fused kernels take half precision only
    out = jax.nn.dot_product_attention(
        q_BxTxNxH.astype(dtype),
        k_BxSxKxH.astype(dtype),
        v_BxSxKxH.astype(dtype),
        mask=mask_BxNxTxS,
        implementation=impl,
    )
    return out


def causal_mask(q_idx_BxT, k_idx_BxS, key_valid_BxS=None, sliding_window: int | None = None):
    """Boolean ``[B, 1, T, S]``: key position <= query position, key valid, inside the window."""
    mask = k_idx_BxS[:, None, :] <= q_idx_BxT[:, :, None]
    if sliding_window is not None:
        mask &= (q_idx_BxT[:, :, None] - k_idx_BxS[:, None, :]) < sliding_window
    if key_valid_BxS is not None:
        mask &= key_valid_BxS[:, None, :].astype(bool)
    return mask[:, None]
