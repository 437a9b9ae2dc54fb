"""Model FLOPs of the parts (each family adds them up in ``Family.flops_per_sequence``) and device
peaks for MFU, counted as MaxText does: 6 x params x tokens for the
matmuls of forward + backward, plus causal attention; recomputation (remat) is not counted."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.opt import OptConfig

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


# weight matrices of one MLP block: LLaMA's gated MLP has three, OPT's two
MLP_MATRICES = {LlmConfig: 3, OptConfig: 2}


def llm_params(c: LlmConfig | OptConfig) -> int:
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = MLP_MATRICES[type(c)] * c.hidden_size * c.intermediate_size
    head = 0 if c.tie_embeddings else c.hidden_size * c.vocab_size
    return c.num_layers * (attn + mlp) + head  # the embedding lookup costs no matmul


def vit_params(c) -> int:
    """Matmul params of a ViT (CLIP/SigLIP ``VitConfig`` or EVA ``EvaConfig``)."""
    return c.num_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)


def llm_flops_per_token(c: LlmConfig, seq_len: int) -> float:
    # causal attention: QK^T and AV, forward + backward, halved for the mask
    attention = 6 * c.num_layers * seq_len * c.num_heads * c.head_dim * 2 / 2
    return 6.0 * llm_params(c) + attention


def decoder_flops(c: LlmConfig | OptConfig, seq_len: int) -> float:
    """Training FLOPs of the decoder over one sequence of ``seq_len`` tokens."""
    return seq_len * llm_flops_per_token(c, seq_len)


def vision_flops(c, images: int) -> float:
    """Training FLOPs of a ViT over ``images`` images (counted as trained: an upper bound)."""
    return 6.0 * vit_params(c) * c.num_positions * images


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
