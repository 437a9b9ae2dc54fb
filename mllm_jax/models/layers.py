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


# The run's attention kernel, read when a step is traced; set once per process by `use_attention`
# (config.attention, bench --attention). "name": None lets XLA choose; "cudnn" is cuDNN's fused flash
# attention on NVIDIA GPUs (bf16/f16 inputs only); "splash" the Pallas kernel for TPU (models/splash.py).
# "platform": what the run compiles for when that is not this process's default backend (plan compiles
# for a TPU slice on a CPU host). "interpret": run Pallas kernels in the interpreter (tests on CPU).
ATTENTION_IMPLEMENTATION: dict = {"name": None, "platform": None, "interpret": False}
ATTENTION_CHOICES = {"xla": None, "cudnn": "cudnn", "splash": "splash"}  # config value -> name


def compile_platform() -> str:
    return ATTENTION_IMPLEMENTATION.get("platform") or jax.default_backend()


def _check_splash():
    platform = compile_platform()
    if platform != "tpu" and not ATTENTION_IMPLEMENTATION.get("interpret"):
        raise ValueError(
            f"attention 'splash' is a TPU kernel (Pallas/Mosaic), but this run compiles for {platform}: "
            "use 'xla' (or 'cudnn' on a GPU)"
        )


def use_attention(choice: str) -> None:
    """Select the attention kernel for every step traced from now on (one line of error if it cannot
    run where this process compiles)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention {choice!r}: one of {list(ATTENTION_CHOICES)}")
    if choice == "splash":
        _check_splash()
    ATTENTION_IMPLEMENTATION["name"] = ATTENTION_CHOICES[choice]


def attention(
    q_BxTxNxH,
    k_BxSxKxH,
    v_BxSxKxH,
    mask_BxNxTxS=None,
    dtype=jnp.float32,
    causal: bool = False,
    sliding_window: int | None = None,
):
    """Scaled dot-product attention through ``jax.nn.dot_product_attention``, or the splash kernel.

    Grouped-query attention is native (N query heads, K kv heads, N % K == 0). ``mask`` is boolean,
    True where a query may attend; broadcastable to ``[B, N, T, S]``. Softmax runs in f32. ``causal``
    says the mask is ``causal_mask(idx, idx, key_valid, sliding_window)`` over this chunk's own
    positions: the splash kernel then builds the causal part itself and reads only the key padding,
    off the mask's diagonal (every valid key sees itself). Splash takes that and unmasked attention;
    other masks (Q-Former, cross-attention, the KV-cache decode path) stay on XLA.
    """
    impl = ATTENTION_IMPLEMENTATION["name"]
    if impl == "splash":
        if mask_BxNxTxS is None or causal:
            return _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxNxTxS, dtype, causal, sliding_window)
        impl = None  # any other mask stays on XLA
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


def _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxNxTxS, dtype, causal: bool, sliding_window):
    from mllm_jax.models import splash  # the Pallas TPU ops are imported only when chosen

    _check_splash()
    key_valid_BxS = None
    if mask_BxNxTxS is not None:
        diagonal = jnp.diagonal(mask_BxNxTxS[:, 0], axis1=-2, axis2=-1)
        key_valid_BxS = jnp.broadcast_to(diagonal, (q_BxTxNxH.shape[0], diagonal.shape[-1]))
    return splash.splash_attention(
        q_BxTxNxH.astype(dtype),
        k_BxSxKxH.astype(dtype),
        v_BxSxKxH.astype(dtype),
        key_valid_BxS,
        causal=causal,
        sliding_window=sliding_window,
        interpret=bool(ATTENTION_IMPLEMENTATION.get("interpret")),
    )


def causal_mask(q_idx_BxT, k_idx_BxS, key_valid_BxS=None, sliding_window: int | None = None):
    """Boolean ``[B, 1, T, S]``: key position <= query position, key valid, inside the window."""
    mask = k_idx_BxS[:, None, :] <= q_idx_BxT[:, :, None]
    if sliding_window is not None:
        mask &= (q_idx_BxT[:, :, None] - k_idx_BxS[:, None, :]) < sliding_window
    if key_valid_BxS is not None:
        mask &= key_valid_BxS[:, None, :].astype(bool)
    return mask[:, None]
