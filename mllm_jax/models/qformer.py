"""BLIP-2's Querying Transformer: learned queries read an image through cross-attention.

A post-LN BERT encoder whose first ``num_queries`` positions are the learned query tokens. Every
``cross_attention_frequency``-th layer (0, k, 2k, ...) lets the queries attend to the image features;
queries and text tokens share the self-attention but have separate feed-forward blocks. InstructBLIP
appends the instruction tokens (embedded by the Q-Former itself) after the queries, so the queries
read the image with the instruction in view. Parameter names follow HF (``mllm_jax.hf.blip2``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import Dense, LayerNorm, activation, attention, constrain, maybe_remat


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2  # layer i cross-attends iff i % frequency == 0
    encoder_hidden_size: int = 64  # width of the image features (the vision tower's hidden size)
    # InstructBLIP: instruction tokens get word + position embeddings and a shared LayerNorm
    # (`embeddings.*`); BLIP-2: only the queries, normalised by a top-level `layernorm`.
    text_input: bool = False
    # The text feed-forward (`intermediate` / `output`) exists: always with text_input, and in BLIP-2
    # checkpoints saved with `use_qformer_text_input` (where it is never used for generation).
    text_ffn: bool = False
    vocab_size: int = 30522  # text_input only
    max_positions: int = 512  # text_input only

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    def validate(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"Q-Former hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        if self.text_input and not self.text_ffn:
            raise ValueError(
                "a Q-Former with text_input needs text_ffn (its text tokens need a feed-forward)"
            )
        activation(self.act)


class QFormerAttention(nn.Module):
    """BERT attention block ``LayerNorm(x + output(attn(x, context)))``; self-attention: ``context = x``."""

    config: QFormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD, context_BxNxE, mask_Bx1xSxN=None):
        c = self.config
        b, s, d = x_BxSxD.shape
        n = context_BxNxE.shape[1]
        proj = lambda name: Dense(d, ("embed", "heads"), dtype=self.dtype, name=name)  # noqa: E731
        q = proj("query")(x_BxSxD).reshape(b, s, c.num_heads, c.head_dim)
        k = proj("key")(context_BxNxE).reshape(b, n, c.num_heads, c.head_dim)
        v = proj("value")(context_BxNxE).reshape(b, n, c.num_heads, c.head_dim)
        out = attention(q, k, v, mask_Bx1xSxN, dtype=self.dtype).reshape(b, s, d)
        out = Dense(d, ("heads", "embed"), dtype=self.dtype, name="output")(out)
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(out + x_BxSxD)


class QFormerFfn(nn.Module):
    """BERT feed-forward block: ``LayerNorm(x + output(act(intermediate(x))))``."""

    config: QFormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD):
        c = self.config
        h = Dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="intermediate")(x_BxSxD)
        h = constrain(activation(c.act)(h), ("act_batch", "act_seq", "act_mlp"))
        h = Dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="output")(h)
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(h + x_BxSxD)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    cross_attention: bool
    num_queries: int  # an attribute, not an argument: it must stay static under nn.remat
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD, self_mask_Bx1x1xS, image_BxNxE, image_mask_Bx1x1xN):
        c = self.config
        num_queries = self.num_queries
        h_BxSxD = QFormerAttention(c, self.dtype, name="attention")(x_BxSxD, x_BxSxD, self_mask_Bx1x1xS)
        q_BxQxD, text_BxTxD = h_BxSxD[:, :num_queries], h_BxSxD[:, num_queries:]
        if self.cross_attention:
            q_BxQxD = QFormerAttention(c, self.dtype, name="crossattention")(
                q_BxQxD, image_BxNxE, image_mask_Bx1x1xN
            )
        q_BxQxD = QFormerFfn(c, self.dtype, name="ffn_query")(q_BxQxD)
        if text_BxTxD.shape[1]:
            text_BxTxD = QFormerFfn(c, self.dtype, name="ffn_text")(text_BxTxD)
            return jnp.concatenate([q_BxQxD, text_BxTxD], axis=1)
        if c.text_ffn and self.is_initializing():  # BLIP-2 checkpoints may carry an unused text FFN
            QFormerFfn(c, self.dtype, name="ffn_text")(q_BxQxD)
        return q_BxQxD


class QFormerEmbeddings(nn.Module):
    """InstructBLIP: word + position embeddings of the text after the queries, one LayerNorm over both."""

    config: QFormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries_BxQxD, text_BxT=None):
        c = self.config
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n,
            c.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name=name,
        )
        words, positions = (
            embed(c.vocab_size, "word_embeddings"),
            embed(c.max_positions, "position_embeddings"),
        )
        x_BxSxD = queries_BxQxD
        if text_BxT is not None and text_BxT.shape[1]:
            t = text_BxT.shape[1]
            if t > c.max_positions:
                raise ValueError(f"{t} Q-Former text tokens exceed its {c.max_positions} positions")
            text_BxTxD = words(jnp.clip(text_BxT, 0, c.vocab_size - 1)) + positions(jnp.arange(t))[None]
            x_BxSxD = jnp.concatenate([x_BxSxD, text_BxTxD.astype(x_BxSxD.dtype)], axis=1)
        elif self.is_initializing():  # create the tables even when initialised without text
            words(jnp.zeros((1,), jnp.int32)), positions(jnp.zeros((1,), jnp.int32))
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layernorm")(x_BxSxD)


class QFormer(nn.Module):
    """Queries ``[B, Q, D]`` (+ optional text tokens ``[B, T]``) reading image features ``[B, N, E]``.

    Returns the last hidden states ``[B, Q + T, D]``; the first ``Q`` rows are the query outputs.
    ``text_mask_BxT`` marks valid text tokens (1) against padding (0); ``image_mask_BxN`` likewise.
    """

    config: QFormerConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # a layers.REMAT_POLICIES name

    @nn.compact
    def __call__(self, queries_BxQxD, image_BxNxE, text_BxT=None, text_mask_BxT=None, image_mask_BxN=None):
        c = self.config
        b, q, _ = queries_BxQxD.shape
        x_BxSxD = queries_BxQxD.astype(self.dtype)
        if c.text_input:
            x_BxSxD = QFormerEmbeddings(c, self.dtype, name="embeddings")(x_BxSxD, text_BxT)
        else:
            if text_BxT is not None:
                raise ValueError("this Q-Former has no text embeddings (text_input=False)")
            x_BxSxD = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layernorm")(x_BxSxD)
        s = x_BxSxD.shape[1]
        valid_BxS = jnp.ones((b, s), bool)
        if text_mask_BxT is not None:
            valid_BxS = valid_BxS.at[:, q:].set(text_mask_BxT.astype(bool))
        self_mask = valid_BxS[:, None, None, :]
        image_mask = None if image_mask_BxN is None else image_mask_BxN.astype(bool)[:, None, None, :]
        image_BxNxE = image_BxNxE.astype(self.dtype)
        layer = maybe_remat(QFormerLayer, self.remat)
        for i in range(c.num_layers):
            # "layer_i", not "layers_i": the layers differ (cross-attention every k-th), so they must
            # stay out of scan.stack_layers, which stacks every "layers_0..N" group it finds.
            x_BxSxD = layer(c, c.has_cross_attention(i), q, self.dtype, name=f"layer_{i}")(
                x_BxSxD, self_mask, image_BxNxE, image_mask
            )
            x_BxSxD = constrain(x_BxSxD, ("act_batch", "act_seq", "act_embed"))
        return x_BxSxD


class QFormerAdapter(nn.Module):
    """The BLIP-2 adapter: learned ``query_tokens``, the ``qformer`` and a ``language_projection``.

    Image features ``[B, N, E]`` (+ optional instruction tokens) -> LLM inputs ``[B, num_queries, F]``.
    The Q-Former runs in f32 whatever ``dtype`` is, as HF keeps it (its LayerNorm eps is 1e-12).
    """

    config: QFormerConfig
    num_queries: int = 32
    out_features: int = 64
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, image_BxNxE, text_BxT=None, text_mask_BxT=None):
        c = self.config
        b = image_BxNxE.shape[0]
        query_tokens = self.param(
            "query_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, self.num_queries, c.hidden_size),
        )
        queries_BxQxD = jnp.broadcast_to(
            query_tokens.astype(jnp.float32), (b, self.num_queries, c.hidden_size)
        )
        hidden = QFormer(c, jnp.float32, self.remat, name="qformer")(
            queries_BxQxD, image_BxNxE.astype(jnp.float32), text_BxT, text_mask_BxT
        )
        out = hidden[:, : self.num_queries].astype(self.dtype)
        out = Dense(self.out_features, ("mlp", "embed"), dtype=self.dtype, name="language_projection")(out)
        return constrain(out, ("act_batch", "act_seq", "act_embed"))
