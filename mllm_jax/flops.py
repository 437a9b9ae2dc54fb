"""Model FLOPs and device peaks for MFU, counted as MaxText does: 6 x params x tokens for the
matmuls of forward + backward, plus causal attention; recomputation (remat) is not counted."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import LlavaConfig
from mllm_jax.models.vit import VitConfig

# Dense bf16 peak per chip (FLOP/s), by jax device_kind.
PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


def llm_params(c: LlmConfig) -> int:
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    head = 0 if c.tie_embeddings else c.hidden_size * c.vocab_size
    return c.num_layers * (attn + mlp) + head  # the embedding lookup costs no matmul


def vit_params(c: VitConfig) -> int:
    return c.num_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)


def llm_flops_per_token(c: LlmConfig, seq_len: int) -> float:
    # causal attention: QK^T and AV, forward + backward, halved for the mask
    attention = 6 * c.num_layers * seq_len * c.num_heads * c.head_dim * 2 / 2
    return 6.0 * llm_params(c) + attention


def llava_flops_per_sequence(c: LlavaConfig, seq_len: int, images: int = 1) -> float:
    """Training FLOPs of one sequence of ``seq_len`` tokens with ``images`` images, counting the vision
    tower and projector as trained (an upper bound for stages that freeze them)."""
    vision = 6.0 * vit_params(c.vision) * c.vision.num_positions * images
    projector_params = c.projector.in_features * c.projector.out_features + (c.projector.depth - 1) * (
        c.projector.out_features**2
    )
    projector = 6.0 * projector_params * c.tokens_per_image * images
    return seq_len * llm_flops_per_token(c.llm, seq_len) + vision + projector


@functools.lru_cache(maxsize=1)
def peak_flops_per_device() -> float:
    """The device's bf16 peak; on CPU, the measured f32 rate of a 2048x2048 jitted matmul."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return PEAKS.get(device.device_kind, 0.0)
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2]
