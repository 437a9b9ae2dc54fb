"""Shared building blocks: activations, normalisation, dense layers and attention.

Every parameter carries *logical* axis names (see ``mllm_jax.sharding``); the mapping of those
names onto the device mesh lives in one table there, never in the modules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import splash


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
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if jax.sharding.get_abstract_mesh().size > 1:
            # partitioned: keep the [B, T, in] dot whose layout the constraints pin; flattened, the
            # projector's pinned input (projector.py) no longer reached its dot and XLA's partitioner
            # again computed wrong rows on data=2, fsdp=2, tensor=2 (test_generate_sharded.py)
            y = jnp.dot(x, kernel)
        else:
            # one contracting dim: for [B, T, in] XLA:CPU transposes the activations (or their
            # gradient) to build the kernel's gradient; 1.2x on bench's small step (docs/benchmarks.md)
            y = jnp.dot(x.reshape(-1, in_features), kernel).reshape(*x.shape[:-1], self.features)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def _norm_param(module, name: str, init, d: int):
    return module.param(name, nn.with_logical_partitioning(init, ("norm",)), (d,), module.param_dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in f32 (as torch does for f32 and as we want for bf16 stability)."""

    eps: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scale_init: float = 1.0  # init only (the Perceiver's context norm starts larger: perceiver.py)

    @nn.compact
    def __call__(self, x):
        scale = _norm_param(self, "scale", nn.initializers.constant(self.scale_init), x.shape[-1])
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            y = y + _norm_param(self, "bias", nn.initializers.zeros, x.shape[-1]).astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in f32, cast back, then scale (HF's exact order)."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        scale = _norm_param(self, "scale", nn.initializers.ones, x.shape[-1])
        return scale.astype(self.dtype) * y.astype(self.dtype)


def mlp(x, width: int, out: int, act: str, bias: bool, dtype, names=("fc1", "fc2")):
    """``Dense -> act -> Dense``, built in the calling module's scope under ``names`` (HF's)."""
    h = Dense(width, ("embed", "mlp"), bias, dtype, name=names[0])(x)
    h = constrain(activation(act)(h), ("act_batch", "act_seq", "act_mlp"))
    return Dense(out, ("mlp", "embed"), bias, dtype, name=names[1])(h)


class Mlp(nn.Module):
    """``mlp`` as a module, back to the input's width."""

    width: int
    act: str
    bias: bool = True
    dtype: jnp.dtype = jnp.float32
    names: tuple[str, str] = ("fc1", "fc2")

    @nn.compact
    def __call__(self, x):
        return mlp(x, self.width, x.shape[-1], self.act, self.bias, self.dtype, self.names)


class GatedMlp(nn.Module):
    """LLaMA's ``down_proj(act(gate_proj(x)) * up_proj(x))``, back to the input's width."""

    width: int
    act: str
    bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: Dense(self.width, ("embed", "mlp"), self.bias, self.dtype, name=name)  # noqa: E731
        h = activation(self.act)(dense("gate_proj")(x)) * dense("up_proj")(x)
        h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        return Dense(x.shape[-1], ("mlp", "embed"), self.bias, self.dtype, name="down_proj")(h)


def split_heads(
    x_BxTxE, name: str, num_heads: int, head_dim: int, bias: bool, dtype, axes=("embed", "heads")
):
    """A ``Dense`` projection to ``num_heads * head_dim`` split into heads: ``[B, T, E] -> [B, T, N, H]``."""
    y = Dense(num_heads * head_dim, axes, bias, dtype, name=name)(x_BxTxE)
    return y.reshape(*x_BxTxE.shape[:-1], num_heads, head_dim)


def merge_heads(x_BxTxNxH, name: str, out: int, bias: bool, dtype):
    """The heads joined again and projected back: ``[B, T, N, H] -> [B, T, out]``."""
    return Dense(out, ("heads", "embed"), bias, dtype, name=name)(
        x_BxTxNxH.reshape(*x_BxTxNxH.shape[:-2], -1)
    )


# config value -> jax.nn.dot_product_attention's `implementation` (None lets XLA choose); "cudnn" is
# cuDNN's fused flash attention on NVIDIA GPUs (bf16/f16 only), "splash" the Pallas TPU kernel (splash.py)
ATTENTION_CHOICES = {"xla": None, "cudnn": "cudnn", "splash": "splash"}


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """Which kernel ``attention`` runs: a module field (hashable, static under jit, scan and remat), so
    the choice travels with the model instead of living in process state."""

    name: str = "xla"  # an ATTENTION_CHOICES key
    # what the step compiles for when not this process's default backend (plan compiles for TPU on a CPU host)
    platform: str | None = None
    interpret: bool = False  # run Pallas kernels in the interpreter (tests on CPU)

    def __post_init__(self):
        if self.name not in ATTENTION_CHOICES:
            raise ValueError(f"attention {self.name!r}: one of {list(ATTENTION_CHOICES)}")

    def check(self) -> AttentionKernel:
        """Itself, or one line of error if it cannot run where the step compiles."""
        platform = self.platform or jax.default_backend()
        if self.name == "splash" and platform != "tpu" and not self.interpret:
            raise ValueError(
                f"attention 'splash' is a TPU kernel (Pallas/Mosaic), but this run compiles for {platform}: "
                "use 'xla' (or 'cudnn' on a GPU)"
            )
        return self


class Part(nn.Module):
    """A model part: its config (each subclass names the type) and the compute dtype."""

    config: Any
    dtype: jnp.dtype = jnp.float32


class Block(Part):
    """A part that attends: the attention kernel too, which it passes on to every part it builds."""

    attention: AttentionKernel = AttentionKernel()


class Stack(Part):
    """As ``Block``, for a part with a stack of layers: their rematerialisation too."""

    remat: str = "none"  # a REMAT_POLICIES name
    attention: AttentionKernel = AttentionKernel()


class ScanStack(Part):
    """As ``Stack``, for the towers, decoders and composites whose layers may run under one nn.scan."""

    remat: str = "none"  # a REMAT_POLICIES name
    scan_layers: bool = False  # params stacked under "layers" (see scan.py)
    attention: AttentionKernel = AttentionKernel()


@dataclasses.dataclass(frozen=True)
class EncoderDims:
    """The sizes an encoder config starts with (``vit.TowerConfig``, ``qformer.QFormerConfig``)."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check_heads(self, what: str):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{what} hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )


def attention_kernel(choice: str, platform: str | None = None, interpret: bool = False) -> AttentionKernel:
    """The kernel for a config's or flag's ``choice`` (an ATTENTION_CHOICES key), checked against the
    platform the step compiles for (``platform``, else this process's default backend)."""
    return AttentionKernel(choice, platform, interpret).check()


def attention(
    q_BxTxNxH,
    k_BxSxKxH,
    v_BxSxKxH,
    mask_BxNxTxS=None,
    dtype=jnp.float32,
    causal: bool = False,
    sliding_window: int | None = None,
    kernel: AttentionKernel = AttentionKernel(),
):
    """Scaled dot-product attention: XLA's (``_xla_attention``), cuDNN's or the splash kernel.

    Grouped-query attention is native (N query heads, K kv heads, N % K == 0). ``mask`` is boolean,
    True where a query may attend; broadcastable to ``[B, N, T, S]``. Softmax runs in f32. ``causal``
    says the mask is ``causal_mask(idx, idx, key_valid, sliding_window)`` over this chunk's own
    positions: the splash kernel then builds the causal part itself and reads only the segment ids
    (key padding, and packed rows' examples) off the mask (``segments_of``). Splash takes that and
    unmasked attention; other masks (Q-Former, cross-attention, the KV-cache decode path) stay on XLA.
    """
    impl = ATTENTION_CHOICES[kernel.name]
    if impl == "splash":
        if mask_BxNxTxS is None or causal:
            return _splash(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxNxTxS, dtype, causal, sliding_window, kernel
            )
        impl = None  # any other mask stays on XLA
    if impl is None or dtype == jnp.float32:  # the fused kernels take half precision only
        return _xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxNxTxS, dtype)
    return jax.nn.dot_product_attention(
        q_BxTxNxH.astype(dtype),
        k_BxSxKxH.astype(dtype),
        v_BxSxKxH.astype(dtype),
        mask=mask_BxNxTxS,
        implementation=impl,
    )


# a masked logit: finite, so a query with no key left attends uniformly (as jax.nn.dot_product_attention)
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def _xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxNxTxS, dtype):
    """``jax.nn.dot_product_attention``'s arithmetic laid out for XLA: heads before positions, a query
    head group folded into the query rows (one batched dot over [B, K], GQA included). A select, not
    an added bias, masks the logits: it costs a pass, but a query with no key left then gets no
    gradient, as its (uniform) output depends on none of its logits. On XLA:CPU forward and backward
    take about 0.8x the time of ``jax.nn.dot_product_attention``'s (docs/benchmarks.md)."""
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    g = n // k
    q_BxKxGTxH = (
        q_BxTxNxH.astype(dtype).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
    )
    k_BxKxSxH = k_BxSxKxH.astype(dtype).transpose(0, 2, 1, 3)
    v_BxKxSxH = v_BxSxKxH.astype(dtype).transpose(0, 2, 1, 3)
    logits_BxKxGTxS = jnp.einsum("bkth,bksh->bkts", q_BxKxGTxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    logits_BxKxGTxS = logits_BxKxGTxS * (1.0 / math.sqrt(h))
    if mask_BxNxTxS is not None:
        mb, mn, mt, ms = jnp.shape(mask_BxNxTxS)
        kk, gg = (k, g) if mn == n else (1, 1)  # per-head masks split into (K, G) as the queries are
        mask_BxKxGxTxS = jnp.reshape(mask_BxNxTxS, (mb, kk, gg, mt, ms))
        if g > 1:
            mask_BxKxGxTxS = jnp.broadcast_to(mask_BxKxGxTxS, (mb, kk, g, t, ms))
        mask_BxKxGTxS = mask_BxKxGxTxS.reshape(mb, kk, -1, ms)
        logits_BxKxGTxS = jnp.where(mask_BxKxGTxS, logits_BxKxGTxS, MASKED_LOGIT)
    probs_BxKxGTxS = jax.nn.softmax(logits_BxKxGTxS, axis=-1).astype(dtype)
    out_BxKxGTxH = jnp.einsum("bkts,bksh->bkth", probs_BxKxGTxS, v_BxKxSxH)
    return out_BxKxGTxH.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxNxTxS, dtype, causal: bool, sliding_window, kernel):
    kernel.check()  # a kernel built without attention_kernel is checked when a step is traced
    key_valid_BxS = None
    if mask_BxNxTxS is not None:
        # only a causal chunk_mask comes here: its segments (padding 0) are the kernel's segment ids
        mask_BxTxT = jnp.broadcast_to(mask_BxNxTxS[:, 0], (q_BxTxNxH.shape[0], *mask_BxNxTxS.shape[-2:]))
        key_valid_BxS = segments_of(mask_BxTxT)
    return splash.splash_attention(
        q_BxTxNxH.astype(dtype),
        k_BxSxKxH.astype(dtype),
        v_BxSxKxH.astype(dtype),
        key_valid_BxS,
        causal=causal,
        sliding_window=sliding_window,
        interpret=kernel.interpret,
    )


def segments_of(mask_BxTxT):
    """Segment ids ``[B, T]`` (0: padding) read off a causal ``chunk_mask``: a valid token starts a new
    segment when it may not see the valid token before it (packed rows; exact for any sliding window,
    holes of padding included), so splash can take the mask as its segment ids."""
    t = mask_BxTxT.shape[-1]
    valid_BxT = jnp.diagonal(mask_BxTxT, axis1=-2, axis2=-1)
    last_valid_BxT = jax.lax.cummax(jnp.where(valid_BxT, jnp.arange(t), -1), axis=1)
    previous_BxT = jnp.pad(last_valid_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    sees_BxT = jnp.take_along_axis(mask_BxTxT, jnp.maximum(previous_BxT, 0)[..., None], axis=-1)[..., 0]
    starts_BxT = ~(sees_BxT & (previous_BxT >= 0))
    return jnp.where(valid_BxT, jnp.cumsum(starts_BxT & valid_BxT, axis=1), 0)


def causal_mask(q_idx_BxT, k_idx_BxS, key_valid_BxS=None, sliding_window: int | None = None):
    """Boolean ``[B, 1, T, S]``: key position <= query position, key valid, inside the window."""
    mask = k_idx_BxS[:, None, :] <= q_idx_BxT[:, :, None]
    if sliding_window is not None:
        mask &= (q_idx_BxT[:, :, None] - k_idx_BxS[:, None, :]) < sliding_window
    if key_valid_BxS is not None:
        mask &= key_valid_BxS[:, None, :].astype(bool)
    return mask[:, None]
