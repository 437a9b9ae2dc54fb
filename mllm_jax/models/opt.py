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
import jax.numpy as jnp

from mllm_jax.models import layers, llm
from mllm_jax.models.scan import layer_stack

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
        layers.activation(self.act)


class OptAttention(layers.Block):
    config: OptConfig

    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1xTxS, cache=None, cache_index_B=None):
        c = self.config
        heads = lambda name: layers.split_heads(x_BxTxD, name, c.num_heads, c.head_dim, c.bias, self.dtype)  # noqa: E731
        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        q = layers.constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if cache is not None:  # the same functional cache as Llm's
            cache = k, v = llm.write_cache(cache, k, v, cache_index_B)
        out = layers.attention(q, k, v, mask_Bx1xTxS, self.dtype, kernel=self.attention)
        return layers.merge_heads(out, "out_proj", c.hidden_size, c.bias, self.dtype), cache


class OptLayer(layers.Block):
    config: OptConfig

    @nn.compact
    def __call__(self, x_BxTxD, mask, cache=None, cache_index_B=None):
        c = self.config
        attn_norm = layers.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name="self_attn_layer_norm")
        mlp_norm = layers.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype, name="final_layer_norm")
        h = attn_norm(x_BxTxD) if c.pre_norm else x_BxTxD
        h, cache = OptAttention(c, self.dtype, self.attention, name="self_attn")(
            h, mask, cache, cache_index_B
        )
        x_BxTxD = x_BxTxD + h
        if not c.pre_norm:
            x_BxTxD = attn_norm(x_BxTxD)
        h = mlp_norm(x_BxTxD) if c.pre_norm else x_BxTxD
        x_BxTxD = x_BxTxD + layers.mlp(h, c.intermediate_size, c.hidden_size, c.act, c.bias, self.dtype)
        if not c.pre_norm:
            x_BxTxD = mlp_norm(x_BxTxD)
        return layers.constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed")), cache


class Opt(llm.Decoder):
    """Decoder-only OPT LM with ``Llm``'s interface: ``embed`` maps tokens to ``[B, T, E]`` vectors
    (E = ``word_embed_proj_dim``: ``project_in`` runs inside ``__call__``, as in HF, so adapters splice
    at the embedding width), ``__call__`` returns ``(logits_BxTxV, cache)``."""

    config: OptConfig

    def setup(self):
        c = self.config
        self.embed_tokens = llm.token_table(c.vocab_size, c.embed_dim, self.dtype)
        self.embed_positions = llm.token_table(c.max_positions + POSITION_OFFSET, c.hidden_size, self.dtype)
        if c.projects:
            self.project_in = layers.Dense(c.hidden_size, ("mlp", "embed"), use_bias=False, dtype=self.dtype)
            self.project_out = layers.Dense(c.embed_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype)
        layer = layers.maybe_remat(OptLayer, self.remat)
        in_axes = (nn.broadcast, 0, nn.broadcast)
        self.layers = layer_stack(
            layer, c.num_layers, self.scan_layers, in_axes, c, self.dtype, self.attention
        )
        if c.final_norm:
            self.final_layer_norm = layers.LayerNorm(LAYER_NORM_EPS, dtype=self.dtype)
        if not c.tie_embeddings:
            self.lm_head = layers.Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)

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
        mask = llm.chunk_mask(b, t, attention_mask_BxT, cache, cache_index_B)
        x = embeds_BxTxE.astype(self.dtype)
        if c.projects:
            x = self.project_in(x)
        x = x + self.embed_positions(positions_BxT + POSITION_OFFSET)
        x, new_cache = llm.run_layers(self.layers, self.scan_layers, x, (mask,), cache, cache_index_B)
        if c.final_norm:
            x = self.final_layer_norm(x)
        if c.projects:
            x = self.project_out(x)
        return self.head(x), (None if cache is None else new_cache)


def init_cache(c: OptConfig, batch: int, length: int, dtype=jnp.float32, stacked: bool = False):
    """``llm.init_cache`` for OPT: per layer ``(k, v)`` zeros ``[B, S, K, H]`` (stacked for scan)."""
    return llm.init_cache(c, batch, length, dtype, stacked)
