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

from mllm_jax.models.layers import Dense, RMSNorm, activation, attention, causal_mask, constrain, maybe_remat
from mllm_jax.models.scan import scanned

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
    freqs_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None]
    emb = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    cos, sin = jnp.cos(emb)[:, :, None], jnp.sin(emb)[:, :, None]
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    dtype = x_BxTxNxH.dtype
    return x_BxTxNxH * cos.astype(dtype) + rotated * sin.astype(dtype)


class LlmAttention(nn.Module):
    config: LlmConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache=None, cache_index_B=None):
        c = self.config
        b, t, _ = x_BxTxD.shape
        q = Dense(c.num_heads * c.head_dim, ("embed", "heads"), c.qkv_bias, self.dtype, name="q_proj")(
            x_BxTxD
        )
        k = Dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), c.qkv_bias, self.dtype, name="k_proj")(
            x_BxTxD
        )
        v = Dense(c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), c.qkv_bias, self.dtype, name="v_proj")(
            x_BxTxD
        )
        inv_freq = rope_inv_freq(c)
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), positions_BxT, inv_freq)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), positions_BxT, inv_freq)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if cache is not None:
            # Write this chunk at each sample's own offset, then attend over the whole buffer.
            write = jax.vmap(
                lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (i, 0, 0))
            )
            k_cache = write(cache[0], k, cache_index_B)
            v_cache = write(cache[1], v, cache_index_B)
            cache = (k_cache, v_cache)
            k, v = k_cache, v_cache
        # without a cache the mask is causal_mask over this chunk: a run's splash kernel may take it
        out = attention(q, k, v, mask_Bx1xTxS, self.dtype, cache is None, c.sliding_window)
        out = out.reshape(b, t, c.num_heads * c.head_dim)
        out = Dense(c.hidden_size, ("heads", "embed"), c.o_bias, self.dtype, name="o_proj")(out)
        return out, cache


class LlmMlp(nn.Module):
    config: LlmConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = Dense(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, self.dtype, name="gate_proj")(x)
        up = Dense(c.intermediate_size, ("embed", "mlp"), c.mlp_bias, self.dtype, name="up_proj")(x)
        h = constrain(activation(c.act)(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), c.mlp_bias, self.dtype, name="down_proj")(h)


class DecoderLayer(nn.Module):
    config: LlmConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask, cache=None, cache_index_B=None):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x_BxTxD)
        h, cache = LlmAttention(c, self.dtype, name="self_attn")(h, positions_BxT, mask, cache, cache_index_B)
        x_BxTxD = x_BxTxD + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x_BxTxD)
        x_BxTxD = x_BxTxD + LlmMlp(c, self.dtype, name="mlp")(h)
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed")), cache


class Llm(nn.Module):
    """Decoder-only LM. ``embed`` maps tokens to vectors (so adapters can splice images in between),
    ``__call__`` runs the stack on embeddings and returns ``(logits_BxTxV, cache)``."""

    config: LlmConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # a layers.REMAT_POLICIES name
    scan_layers: bool = False  # one nn.scan over the layers (params stacked under "layers")

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        layer = maybe_remat(DecoderLayer, self.remat)
        if self.scan_layers:
            self.layers = scanned(layer, c.num_layers, (nn.broadcast, nn.broadcast, 0, nn.broadcast))(
                c, self.dtype, name="layers"
            )
        else:
            self.layers = [layer(c, self.dtype, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)

    def embed(self, tokens_BxT, images=None):
        if images is not None:
            raise ValueError("a text-only LLM takes no images")
        x = self.embed_tokens(jnp.clip(tokens_BxT, 0, self.config.vocab_size - 1))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))

    def __call__(
        self, embeds_BxTxD, positions_BxT=None, attention_mask_BxT=None, cache=None, cache_index_B=None
    ):
        """Without a cache: causal attention over the chunk, ``attention_mask`` marking valid keys.
        With a cache (from ``init_cache``): the chunk is written at ``cache_index_B`` and attends to
        everything before it in the buffer (``attention_mask`` is then ignored: right-padded prompts are
        overwritten by the decoded tokens before any query can see them)."""
        c = self.config
        b, t, _ = embeds_BxTxD.shape
        if self.is_initializing():  # init from embeddings alone must still create the embedding table
            self.embed(jnp.zeros((1, 1), jnp.int32))
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
        if cache is None:
            idx = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = causal_mask(idx, idx, attention_mask_BxT, c.sliding_window)
        else:
            s = cache[0][0].shape[1]
            q_idx = cache_index_B[:, None] + jnp.arange(t)[None]
            k_idx = jnp.broadcast_to(jnp.arange(s), (b, s))
            mask = causal_mask(q_idx, k_idx, None, c.sliding_window)
        x = embeds_BxTxD.astype(self.dtype)
        if self.scan_layers:  # the cache is stacked: ([L, B, S, K, H], [L, B, S, K, H])
            x, new_cache = self.layers(x, positions_BxT, mask, cache, cache_index_B)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer(
                    x, positions_BxT, mask, None if cache is None else cache[i], cache_index_B
                )
                new_cache.append(layer_cache)
            new_cache = None if cache is None else tuple(new_cache)
        x = self.norm(x)
        if c.tie_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        logits = constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))
        return logits, (None if cache is None else new_cache)

    def decode(
        self, embeds_BxTxD, positions_BxT=None, attention_mask_BxT=None, cache=None, cache_index_B=None
    ):
        return self(embeds_BxTxD, positions_BxT, attention_mask_BxT, cache, cache_index_B)


def init_cache(c: LlmConfig, batch: int, length: int, dtype=jnp.float32, stacked: bool = False):
    """Preallocated KV cache: per layer a ``(k, v)`` pair of zeros ``[B, S, K, H]``; with ``stacked``
    (for ``scan_layers``) one pair of ``[L, B, S, K, H]``."""
    shape = (batch, length, c.num_kv_heads, c.head_dim)
    if stacked:
        return jnp.zeros((c.num_layers, *shape), dtype), jnp.zeros((c.num_layers, *shape), dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers))
