"""LLaMA-family decoder (LLaMA 1-3, Vicuna, Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU, KV cache.

The KV cache is explicit and functional: ``init_cache`` makes a pytree of preallocated ``[B, S, K, H]``
buffers, ``__call__`` takes it with a per-sample write offset and returns the updated one. No mutable
Flax collections, so prefill and the decode loop are plain jitted functions.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models.layers import (
    Block,
    Dense,
    GatedMlp,
    RMSNorm,
    ScanStack,
    attention,
    causal_mask,
    constrain,
    maybe_remat,
    merge_heads,
    split_heads,
)
from mllm_jax.models.scan import layer_stack

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlmConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_positions: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_positions: int = 8192  # llama3 only
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral

    def validate(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} not supported; supported: {ROPE_TYPES}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


def rope_inv_freq(c: LlmConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim/2]`` in float32, computed as transformers does (incl. scaling)."""
    dim = c.head_dim
    inv = 1.0 / (c.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    if c.rope_type == "linear":
        inv = inv / np.float32(c.rope_factor)
    elif c.rope_type == "llama3":
        old = c.rope_original_max_positions
        low_wavelen = old / c.rope_low_freq_factor
        high_wavelen = old / c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
        smooth = (old / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x_BxTxNxH, positions_BxT, inv_freq):
    """Rotate-half RoPE (HF layout: first half / second half of the head dim)."""
    inv_freq_H = jnp.asarray(np.concatenate([inv_freq, inv_freq]))  # each frequency on both halves
    angles_BxTxH = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H[None, None]
    cos, sin = jnp.cos(angles_BxTxH)[:, :, None], jnp.sin(angles_BxTxH)[:, :, None]
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    dtype = x_BxTxNxH.dtype
    return x_BxTxNxH * cos.astype(dtype) + rotated * sin.astype(dtype)


def write_cache(cache, k_BxTxKxH, v_BxTxKxH, cache_index_B):
    """The ``(k, v)`` buffers ``[B, S, K, H]`` with this chunk written at each sample's own offset."""
    write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (i, 0, 0)))
    return write(cache[0], k_BxTxKxH, cache_index_B), write(cache[1], v_BxTxKxH, cache_index_B)


def chunk_mask(b: int, t: int, attention_mask_BxT=None, cache=None, cache_index_B=None, sliding_window=None):
    """A decoder chunk's self-attention mask ``[B, 1, T, S]``. Without a cache: causal over the chunk,
    ``attention_mask`` marking valid keys; its values are segment ids (0: padding; packed rows number
    their examples 1, 2, ...: a query sees only keys of its own segment; a padding query any valid key,
    as with a 0/1 mask). With a cache (per-layer pairs or stacked): each query sees the
    buffer up to its own position (``attention_mask`` is not needed: right-padded prompts are overwritten
    by the decoded tokens before any query can see them)."""
    if cache is None:
        idx_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = causal_mask(idx_BxT, idx_BxT, attention_mask_BxT, sliding_window)
        if attention_mask_BxT is None:
            return mask
        seg_BxT = attention_mask_BxT.astype(jnp.int32)
        same_BxTxS = (seg_BxT[:, :, None] == seg_BxT[:, None, :]) | (seg_BxT[:, :, None] == 0)
        return mask & same_BxTxS[:, None]
    s = cache[0][0].shape[1]
    q_idx_BxT = cache_index_B[:, None] + jnp.arange(t)[None]
    return causal_mask(q_idx_BxT, jnp.broadcast_to(jnp.arange(s), (b, s)), None, sliding_window)


def run_layers(layers, scan: bool, x_BxTxD, args: tuple, cache, cache_index_B):
    """``layers`` (a ``layer_stack``) over ``x``, each called as ``layer(x, *args, its cache,
    cache_index_B)`` -> ``(x, new cache)``; scanned, the cache is stacked: ``([L, B, S, K, H], ...)``."""
    if scan:
        return layers(x_BxTxD, *args, cache, cache_index_B)
    new_cache = []
    for i, layer in enumerate(layers):
        x_BxTxD, layer_cache = layer(x_BxTxD, *args, None if cache is None else cache[i], cache_index_B)
        new_cache.append(layer_cache)
    return x_BxTxD, None if cache is None else tuple(new_cache)


class LlmAttention(Block):
    config: LlmConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache=None, cache_index_B=None):
        c = self.config
        heads = lambda name, n, axes: split_heads(x_BxTxD, name, n, c.head_dim, c.qkv_bias, self.dtype, axes)  # noqa: E731
        inv_freq = rope_inv_freq(c)
        q = apply_rope(heads("q_proj", c.num_heads, ("embed", "heads")), positions_BxT, inv_freq)
        k = apply_rope(heads("k_proj", c.num_kv_heads, ("embed", "kv_heads")), positions_BxT, inv_freq)
        v = heads("v_proj", c.num_kv_heads, ("embed", "kv_heads"))
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if cache is not None:  # attend over the whole buffer, this chunk written into it
            cache = k, v = write_cache(cache, k, v, cache_index_B)
        # without a cache the mask is causal_mask over this chunk: a run's splash kernel may take it
        out = attention(q, k, v, mask_Bx1xTxS, self.dtype, cache is None, c.sliding_window, self.attention)
        return merge_heads(out, "o_proj", c.hidden_size, c.o_bias, self.dtype), cache


class DecoderLayer(Block):
    config: LlmConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask, cache=None, cache_index_B=None):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x_BxTxD)
        attn = LlmAttention(c, self.dtype, self.attention, name="self_attn")
        h, cache = attn(h, positions_BxT, mask, cache, cache_index_B)
        x_BxTxD = x_BxTxD + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x_BxTxD)
        x_BxTxD = x_BxTxD + GatedMlp(c.intermediate_size, c.act, c.mlp_bias, self.dtype, name="mlp")(h)
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed")), cache


class Decoder(ScanStack):
    """What ``Llm`` and ``Opt`` share: the token embedding, the tied or separate LM head, and ``decode``
    (the same as ``__call__``, so composites and ``generate`` drive every decoder one way)."""

    def embed(self, tokens_BxT, images=None):
        if images is not None:
            raise ValueError("a text-only LLM takes no images")
        x = self.embed_tokens(jnp.clip(tokens_BxT, 0, self.config.vocab_size - 1))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))

    def head(self, x_BxTxD):
        logits = self.embed_tokens.attend(x_BxTxD) if self.config.tie_embeddings else self.lm_head(x_BxTxD)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

    def decode(
        self, embeds_BxTxD, positions_BxT=None, attention_mask_BxT=None, cache=None, cache_index_B=None
    ):
        return self(embeds_BxTxD, positions_BxT, attention_mask_BxT, cache, cache_index_B)


def token_table(n: int, d: int, dtype):
    """An ``[n, d]`` embedding table (HF's N(0, 0.02) init), in the calling module's scope."""
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
    return nn.Embed(n, d, dtype=dtype, embedding_init=init)


class Llm(Decoder):
    """Decoder-only LM. ``embed`` maps tokens to vectors (so adapters can splice images in between),
    ``__call__`` runs the stack on embeddings and returns ``(logits_BxTxV, cache)``."""

    config: LlmConfig

    def setup(self):
        c = self.config
        self.embed_tokens = token_table(c.vocab_size, c.hidden_size, self.dtype)
        layer = maybe_remat(DecoderLayer, self.remat)
        in_axes = (nn.broadcast, nn.broadcast, 0, nn.broadcast)
        self.layers = layer_stack(
            layer, c.num_layers, self.scan_layers, in_axes, c, self.dtype, self.attention
        )
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)

    def __call__(
        self, embeds_BxTxD, positions_BxT=None, attention_mask_BxT=None, cache=None, cache_index_B=None
    ):
        """Without a cache: causal attention over the chunk, ``attention_mask`` marking valid keys.
        With a cache (from ``init_cache``): the chunk is written at ``cache_index_B`` and attends to
        everything before it in the buffer (``chunk_mask``)."""
        c = self.config
        b, t, _ = embeds_BxTxD.shape
        if self.is_initializing():  # init from embeddings alone must still create the embedding table
            self.embed(jnp.zeros((1, 1), jnp.int32))
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = chunk_mask(b, t, attention_mask_BxT, cache, cache_index_B, c.sliding_window)
        x = embeds_BxTxD.astype(self.dtype)
        x, new_cache = run_layers(
            self.layers, self.scan_layers, x, (positions_BxT, mask), cache, cache_index_B
        )
        return self.head(self.norm(x)), (None if cache is None else new_cache)


def init_cache(c: LlmConfig, batch: int, length: int, dtype=jnp.float32, stacked: bool = False):
    """Preallocated KV cache: per layer a ``(k, v)`` pair of zeros ``[B, S, K, H]``; with ``stacked``
    (for ``scan_layers``) one pair of ``[L, B, S, K, H]``."""
    shape = (batch, length, c.num_kv_heads, c.head_dim)
    if stacked:
        return jnp.zeros((c.num_layers, *shape), dtype), jnp.zeros((c.num_layers, *shape), dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers))
