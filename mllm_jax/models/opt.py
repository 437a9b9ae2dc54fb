"""OPT decoder (Meta's OPT, the text model of BLIP-2 OPT checkpoints), with the ``Llm`` interface.

Learned absolute positions (table offset by 2, as in fairseq/HF), LayerNorm (pre-LN, or post-LN for
opt-350m), ReLU MLP, biases everywhere, tied LM head, and an optional ``project_in``/``project_out``
pair when the word embeddings are narrower than the model. ``embed`` / ``__call__`` / ``decode`` and
the explicit KV cache work exactly like ``mllm_jax.models.llm.Llm``, so the composites, ``generate``
and training code drive either decoder the same way.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models import llm
from mllm_jax.models.layers import (
    Dense,
    LayerNorm,
    activation,
    attention,
    causal_mask,
    constrain,
    maybe_remat,
)
from mllm_jax.models.scan import scanned

POSITION_OFFSET = 2  # fairseq reserved rows 0 and 1 of the position table (padding); HF kept them
LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default: HF OPT has no config field for it


@dataclasses.dataclass(frozen=True)
class OptConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 256  # HF `ffn_dim`
    num_layers: int = 2
    num_heads: int = 4
    word_embed_proj_dim: int | None = None  # None: = hidden_size (no project_in / project_out)
    max_positions: int = 2048
    act: str = "relu"
    pre_norm: bool = True  # HF `do_layer_norm_before` (False only for opt-350m)
    remove_final_layer_norm: bool = False  # HF `_remove_final_layer_norm`
    bias: bool = True  # HF `enable_bias`: q/k/v/out_proj and fc1/fc2 biases
    tie_embeddings: bool = True

    # The attributes below make an OptConfig usable wherever an LlmConfig's cache geometry is read
    # (``llm.init_cache``, ``generate``): OPT has plain multi-head attention.
    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def projects(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def final_norm(self) -> bool:
        return self.pre_norm and not self.remove_final_layer_norm

    def validate(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        activation(self.act)


class OptAttention(nn.Module):
    config: OptConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1xTxS, cache=None, cache_index_B=None):
        c = self.config
        b, t, _ = x_BxTxD.shape
        proj = lambda name: Dense(c.hidden_size, ("embed", "heads"), c.bias, self.dtype, name=name)  # noqa: E731
        q = proj("q_proj")(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
        k = proj("k_proj")(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
        v = proj("v_proj")(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if cache is not None:
            # Same functional cache as Llm: write this chunk at each sample's offset, attend to the buffer.
            write = jax.vmap(
                lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (i, 0, 0))
            )
            cache = (write(cache[0], k, cache_index_B), write(cache[1], v, cache_index_B))
            k, v = cache
        out = attention(q, k, v, mask_Bx1xTxS, dtype=self.dtype).reshape(b, t, c.hidden_size)
        return Dense(c.hidden_size, ("heads", "embed"), c.bias, self.dtype, name="out_proj")(out), cache


class OptLayer(nn.Module):
    config: OptConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, mask, cache=None, cache_index_B=None):
        c = self.config
        attn_norm = LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name="self_attn_layer_norm")
        mlp_norm = LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name="final_layer_norm")
        h = attn_norm(x_BxTxD) if c.pre_norm else x_BxTxD
        h, cache = OptAttention(c, self.dtype, name="self_attn")(h, mask, cache, cache_index_B)
        x_BxTxD = x_BxTxD + h
        if not c.pre_norm:
            x_BxTxD = attn_norm(x_BxTxD)
        h = mlp_norm(x_BxTxD) if c.pre_norm else x_BxTxD
        h = Dense(c.intermediate_size, ("embed", "mlp"), c.bias, self.dtype, name="fc1")(h)
        h = constrain(activation(c.act)(h), ("act_batch", "act_seq", "act_mlp"))
        x_BxTxD = x_BxTxD + Dense(c.hidden_size, ("mlp", "embed"), c.bias, self.dtype, name="fc2")(h)
        if not c.pre_norm:
            x_BxTxD = mlp_norm(x_BxTxD)
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed")), cache


class Opt(nn.Module):
    """Decoder-only OPT LM with ``Llm``'s interface: ``embed`` maps tokens to ``[B, T, embed_dim]``
    vectors (``word_embed_proj_dim`` wide: ``project_in`` runs inside ``__call__``, as in HF, so
    adapters splice at the embedding width), ``__call__`` returns ``(logits_BxTxV, cache)``."""

    config: OptConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # a layers.REMAT_POLICIES name
    scan_layers: bool = False  # one nn.scan over the layers (params stacked under "layers")

    def setup(self):
        c = self.config
        table = lambda n, d: nn.Embed(  # noqa: E731
            n,
            d,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        self.embed_tokens = table(c.vocab_size, c.embed_dim)
        self.embed_positions = table(c.max_positions + POSITION_OFFSET, c.hidden_size)
        if c.projects:
            self.project_in = Dense(c.hidden_size, ("mlp", "embed"), use_bias=False, dtype=self.dtype)
            self.project_out = Dense(c.embed_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype)
        layer = maybe_remat(OptLayer, self.remat)
        if self.scan_layers:
            self.layers = scanned(layer, c.num_layers, (nn.broadcast, 0, nn.broadcast))(
                c, self.dtype, name="layers"
            )
        else:
            self.layers = [layer(c, self.dtype, name=f"layers_{i}") for i in range(c.num_layers)]
        if c.final_norm:
            self.final_layer_norm = LayerNorm(LAYER_NORM_EPS, dtype=self.dtype)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)

    def embed(self, tokens_BxT, images=None):
        if images is not None:
            raise ValueError("a text-only LLM takes no images")
        x = self.embed_tokens(jnp.clip(tokens_BxT, 0, self.config.vocab_size - 1))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))

    def __call__(
        self, embeds_BxTxE, positions_BxT=None, attention_mask_BxT=None, cache=None, cache_index_B=None
    ):
        """As ``Llm.__call__``. ``positions_BxT`` are 0-based token positions (the +2 table offset is
        added here). Left out, they follow HF: ``cumsum(mask) - 1`` over the attention mask (so left
        padding does not shift the text), ``arange`` without a mask, ``cache_index + arange`` with a cache.
        """
        c = self.config
        b, t, _ = embeds_BxTxE.shape
        if self.is_initializing():  # init from embeddings alone must still create the embedding table
            self.embed(jnp.zeros((1, 1), jnp.int32))
        if positions_BxT is None:
            if cache is not None:
                positions_BxT = cache_index_B[:, None] + jnp.arange(t)[None]
            elif attention_mask_BxT is not None:
                m = attention_mask_BxT.astype(jnp.int32)
                positions_BxT = jnp.cumsum(m, axis=1) * m - 1
            else:
                positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
        if cache is None:
            idx = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = causal_mask(idx, idx, attention_mask_BxT)
        else:
            s = cache[0][0].shape[1]
            q_idx = cache_index_B[:, None] + jnp.arange(t)[None]
            mask = causal_mask(q_idx, jnp.broadcast_to(jnp.arange(s), (b, s)))
        x = embeds_BxTxE.astype(self.dtype)
        if c.projects:
            x = self.project_in(x)
        x = x + self.embed_positions(positions_BxT + POSITION_OFFSET)
        if self.scan_layers:  # the cache is stacked: ([L, B, S, K, H], [L, B, S, K, H])
            x, new_cache = self.layers(x, mask, cache, cache_index_B)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer(x, mask, None if cache is None else cache[i], cache_index_B)
                new_cache.append(layer_cache)
            new_cache = None if cache is None else tuple(new_cache)
        if c.final_norm:
            x = self.final_layer_norm(x)
        if c.projects:
            x = self.project_out(x)
        logits = self.embed_tokens.attend(x) if c.tie_embeddings else self.lm_head(x)
        logits = constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))
        return logits, (None if cache is None else new_cache)

    def decode(
        self, embeds_BxTxE, positions_BxT=None, attention_mask_BxT=None, cache=None, cache_index_B=None
    ):
        return self(embeds_BxTxE, positions_BxT, attention_mask_BxT, cache, cache_index_B)


def init_cache(c: OptConfig, batch: int, length: int, dtype=jnp.float32, stacked: bool = False):
    """``llm.init_cache`` for OPT: per layer ``(k, v)`` zeros ``[B, S, H, D]`` (stacked for scan)."""
    return llm.init_cache(c, batch, length, dtype, stacked)
