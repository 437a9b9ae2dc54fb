"""Model FLOPs and device peaks for MFU, counted as MaxText does: 6 x params x tokens for the
matmuls of forward + backward, plus causal attention; recomputation (remat) is not counted."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import LlavaConfig
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


def idefics_flops_per_sequence(c, seq_len: int, images: int = 1) -> float:
    """Flamingo/IDEFICS: the decoder, the vision tower and perceiver per image, and the gated
    cross-attention blocks (queries over the text, keys/values over every image's media tokens)."""
    vision = 6.0 * vit_params(c.vision) * c.vision.num_positions * images
    p = c.perceiver
    inner = p.num_heads * p.head_dim
    context = c.vision.num_positions + p.num_latents
    perceiver = 0.0
    if c.use_resampler:
        per_block = (
            2 * p.embed_dim * inner * (p.num_latents + context) + 2 * p.embed_dim * p.mlp_dim * p.num_latents
        )
        perceiver = 6.0 * p.depth * per_block * images
    x = c.xattn
    inner = x.num_heads * x.head_dim
    media = c.tokens_per_image * images
    per_xattn = (
        2 * x.hidden_size * inner * seq_len  # q and o over the text
        + 2 * x.kv_dim * inner * media  # k and v over the media
        + 3 * x.hidden_size * x.intermediate_size * seq_len  # the gated dense branch
        + 2 * seq_len * media * inner  # scores and weighted sum
    )
    return (
        seq_len * llm_flops_per_token(c.llm, seq_len)
        + vision
        + perceiver
        + 6.0 * c.num_xattn_layers * per_xattn
    )


def blip2_flops_per_sequence(c, seq_len: int, images: int = 1) -> float:
    """BLIP-2: the decoder, the EVA tower, and the Q-Former's queries (self-attention, feed-forward and
    cross-attention to the image every ``cross_attention_frequency`` layers)."""
    vision = 6.0 * vit_params(c.vision) * c.vision.num_positions * images
    q = c.qformer
    n_cross = sum(q.has_cross_attention(i) for i in range(q.num_layers))
    per_query = q.num_layers * (4 * q.hidden_size**2 + 2 * q.hidden_size * q.intermediate_size)
    per_query += n_cross * 2 * q.hidden_size**2  # cross-attention q and o
    kv = n_cross * 2 * q.encoder_hidden_size * q.hidden_size * c.vision.num_positions
    projection = q.hidden_size * c.llm.hidden_size * c.num_query_tokens
    qformer = 6.0 * (per_query * c.num_query_tokens + kv + projection) * images
    return seq_len * llm_flops_per_token(c.llm, seq_len) + vision + qformer
