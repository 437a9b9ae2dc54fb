"""BLIP-2's Querying Transformer: learned queries read an image through cross-attention.

A post-LN BERT encoder whose first ``num_queries`` positions are the learned query tokens. Every
``cross_attention_frequency``-th layer (0, k, 2k, ...) lets the queries attend to the image features;
queries and text tokens share the self-attention but have separate feed-forward blocks. InstructBLIP
appends the instruction tokens (embedded by the Q-Former itself) after the queries, so the queries
read the image with the instruction in view. Parameter names follow HF (``mllm_jax.hf.blip2``).

BLIP-2's stage 1 runs the same Q-Former over ``[queries; text]`` under three self-attention masks
(``MASK_MODES``): "uni" for ITC (queries and text do not see each other), "bi" for ITM and InstructBLIP
(all see all), "causal" for ITG (queries see queries, text sees the queries and earlier text). Its text
embeddings and heads sit in ``QFormerAdapter`` (HF ``Blip2ForImageTextRetrieval``'s top level).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import (
    AttentionKernel,
    Block,
    Dense,
    EncoderDims,
    LayerNorm,
    Part,
    Stack,
    activation,
    attention,
    constrain,
    maybe_remat,
    merge_heads,
    mlp,
    split_heads,
)

# mask mode -> allowed[i, j] over [queries; text] positions, from is_text_i [S, 1], is_text_j [1, S]
# and j <= i [S, S]. Padded keys are masked on top of this.
MASK_MODES = {
    "bi": lambda text_i, text_j, earlier: jnp.ones_like(earlier),
    "uni": lambda text_i, text_j, earlier: text_i == text_j,
    "causal": lambda text_i, text_j, earlier: ~text_j | (text_i & earlier),
}
INIT_TEMP = 0.07  # ITC temperature at init (BLIP-2 / LAVIS)


def self_attention_mask(mode, num_queries: int, valid_BxS):
    """Boolean ``[B, 1, S, S]`` (``[B, 1, 1, S]`` for "bi", as before modes existed).

    ``mode``: a ``MASK_MODES`` name, or a tuple of one per example (several passes in one batch).
    """
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = sorted(set(modes) - set(MASK_MODES))
    if unknown:
        raise ValueError(f"unknown Q-Former mask mode {unknown}; known: {sorted(MASK_MODES)}")
    if len(modes) not in (1, valid_BxS.shape[0]):
        raise ValueError(f"{len(modes)} mask modes for a batch of {valid_BxS.shape[0]}")
    keys = valid_BxS.astype(bool)[:, None, None, :]
    if set(modes) == {"bi"}:
        return keys
    pos = jnp.arange(valid_BxS.shape[1])
    is_text = pos >= num_queries
    args = (is_text[:, None], is_text[None, :], pos[None, :] <= pos[:, None])
    table = {m: MASK_MODES[m](*args) for m in set(modes)}
    return keys & jnp.stack([table[m] for m in modes])[:, None]


@dataclasses.dataclass(frozen=True)
class QFormerConfig(EncoderDims):
    intermediate_size: int = 128
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

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    def validate(self):
        self.check_heads("Q-Former")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        if self.text_input and not self.text_ffn:
            raise ValueError(
                "a Q-Former with text_input needs text_ffn (its text tokens need a feed-forward)"
            )
        activation(self.act)


class QFormerAttention(Block):
    """BERT attention block ``LayerNorm(x + output(attn(x, context)))``; self-attention: ``context = x``."""

    config: QFormerConfig

    @nn.compact
    def __call__(self, x_BxTxD, context_BxSxE, mask_Bx1xTxS=None):
        c = self.config
        heads = lambda name, x: split_heads(x, name, c.num_heads, c.head_dim, True, self.dtype)  # noqa: E731
        q, k, v = heads("query", x_BxTxD), heads("key", context_BxSxE), heads("value", context_BxSxE)
        out = attention(q, k, v, mask_Bx1xTxS, self.dtype, kernel=self.attention)
        out = merge_heads(out, "output", c.hidden_size, True, self.dtype)
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(out + x_BxTxD)


class QFormerFfn(Part):
    """BERT feed-forward block: ``LayerNorm(x + output(act(intermediate(x))))``."""

    config: QFormerConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        h = mlp(
            x_BxTxD, c.intermediate_size, c.hidden_size, c.act, True, self.dtype, ("intermediate", "output")
        )
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(h + x_BxTxD)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    cross_attention: bool
    num_queries: int  # an attribute, not an argument: it must stay static under nn.remat
    dtype: jnp.dtype = jnp.float32
    attention: AttentionKernel = AttentionKernel()

    @nn.compact
    def __call__(self, x_BxSxD, self_mask_Bx1xSxS, image_BxPxE, image_mask_Bx1x1xP):
        c = self.config
        num_queries = self.num_queries
        attn = lambda name: QFormerAttention(c, self.dtype, self.attention, name=name)  # noqa: E731
        h_BxSxD = attn("attention")(x_BxSxD, x_BxSxD, self_mask_Bx1xSxS)
        q_BxQxD, text_BxTxD = h_BxSxD[:, :num_queries], h_BxSxD[:, num_queries:]
        parts = []
        if num_queries:  # zero queries: a text-only pass (stage-1 text features), as HF's query_length=0
            if self.cross_attention:
                q_BxQxD = attn("crossattention")(q_BxQxD, image_BxPxE, image_mask_Bx1x1xP)
            parts.append(QFormerFfn(c, self.dtype, name="ffn_query")(q_BxQxD))
        if text_BxTxD.shape[1]:
            parts.append(QFormerFfn(c, self.dtype, name="ffn_text")(text_BxTxD))
        elif c.text_ffn and self.is_initializing():  # BLIP-2 checkpoints may carry an unused text FFN
            QFormerFfn(c, self.dtype, name="ffn_text")(q_BxQxD)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _embedding_tables(c: QFormerConfig, dtype):
    """Word and position tables, created in the calling module's scope (names as HF's)."""
    embed = lambda n, name: nn.Embed(  # noqa: E731
        n,
        c.hidden_size,
        dtype=dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        name=name,
    )
    return embed(c.vocab_size, "word_embeddings"), embed(c.max_positions, "position_embeddings")


def _embed_text(c: QFormerConfig, words, positions, text_BxT):
    t = text_BxT.shape[1]
    if t > c.max_positions:
        raise ValueError(f"{t} Q-Former text tokens exceed its {c.max_positions} positions")
    return words(jnp.clip(text_BxT, 0, c.vocab_size - 1)) + positions(jnp.arange(t))[None]


class QFormerEmbeddings(Part):
    """InstructBLIP: word + position embeddings of the text after the queries, one LayerNorm over both."""

    config: QFormerConfig

    @nn.compact
    def __call__(self, queries_BxQxD, text_BxT=None):
        c = self.config
        words, positions = _embedding_tables(c, self.dtype)
        x_BxSxD = queries_BxQxD
        if text_BxT is not None and text_BxT.shape[1]:
            text_BxTxD = _embed_text(c, words, positions, text_BxT)
            x_BxSxD = jnp.concatenate([x_BxSxD, text_BxTxD.astype(x_BxSxD.dtype)], axis=1)
        elif self.is_initializing():  # create the tables even when initialised without text
            words(jnp.zeros((1,), jnp.int32)), positions(jnp.zeros((1,), jnp.int32))
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layernorm")(x_BxSxD)


class QFormerTextEmbeddings(Part):
    """BLIP-2 stage 1 (HF ``Blip2TextEmbeddings``): word + position embeddings ``[B, T] -> [B, T, D]``.

    No LayerNorm here: the Q-Former's own ``layernorm`` normalises ``[queries; text]`` together.
    ``attend`` is the ITG output layer, tied to the word embeddings as BERT's LM head is.
    """

    config: QFormerConfig

    def setup(self):
        self.word_embeddings, self.position_embeddings = _embedding_tables(self.config, self.dtype)

    def __call__(self, text_BxT):
        return _embed_text(self.config, self.word_embeddings, self.position_embeddings, text_BxT)

    def attend(self, x_BxTxD):
        """Hidden states -> logits over the Q-Former vocabulary ``[B, T, V]``."""
        return self.word_embeddings.attend(x_BxTxD.astype(self.dtype))


class QFormer(Stack):
    """Queries ``[B, Q, D]`` (+ optional text tokens ``[B, T]``) reading image features ``[B, P, E]``.

    Returns the last hidden states ``[B, S, D]``, S = Q + T (every position is a key of the
    self-attention); the first ``Q`` rows are the query outputs.
    ``text_mask_BxT`` marks valid text tokens (1) against padding (0); ``image_mask_BxP`` likewise.
    Text comes as tokens (``text_input``: InstructBLIP's own embeddings) or, for BLIP-2 stage 1, as
    ``text_embeds_BxTxD`` from ``QFormerTextEmbeddings``. ``mask_mode`` is a ``MASK_MODES`` name (or
    one per example); with zero queries (a text-only pass) ``image_BxPxE`` may be None.
    """

    config: QFormerConfig

    @nn.compact
    def __call__(
        self,
        queries_BxQxD,
        image_BxPxE,
        text_BxT=None,
        text_mask_BxT=None,
        image_mask_BxP=None,
        text_embeds_BxTxD=None,
        mask_mode: str | tuple[str, ...] = "bi",
    ):
        c = self.config
        b, q, _ = queries_BxQxD.shape
        x_BxSxD = queries_BxQxD.astype(self.dtype)
        if c.text_input:
            if text_embeds_BxTxD is not None:
                raise ValueError("this Q-Former embeds its own text (text_input=True): pass tokens")
            x_BxSxD = QFormerEmbeddings(c, self.dtype, name="embeddings")(x_BxSxD, text_BxT)
        else:
            if text_BxT is not None:
                raise ValueError("this Q-Former has no text embeddings (text_input=False)")
            if text_embeds_BxTxD is not None:
                x_BxSxD = jnp.concatenate([x_BxSxD, text_embeds_BxTxD.astype(self.dtype)], axis=1)
            x_BxSxD = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layernorm")(x_BxSxD)
        s = x_BxSxD.shape[1]
        valid_BxS = jnp.ones((b, s), bool)
        if text_mask_BxT is not None:
            valid_BxS = valid_BxS.at[:, q:].set(text_mask_BxT.astype(bool))
        self_mask = self_attention_mask(mask_mode, q, valid_BxS)
        image_mask = None if image_mask_BxP is None else image_mask_BxP.astype(bool)[:, None, None, :]
        if image_BxPxE is not None:
            image_BxPxE = image_BxPxE.astype(self.dtype)
        elif q:
            raise ValueError("the Q-Former's queries need image features")
        layer = maybe_remat(QFormerLayer, self.remat)
        for i in range(c.num_layers):
            # "layer_i", not "layers_i": the layers differ (cross-attention every k-th), so they must
            # stay out of scan.stack_layers, which stacks every "layers_0..N" group it finds.
            block = layer(c, c.has_cross_attention(i), q, self.dtype, self.attention, name=f"layer_{i}")
            x_BxSxD = block(x_BxSxD, self_mask, image_BxPxE, image_mask)
            x_BxSxD = constrain(x_BxSxD, ("act_batch", "act_seq", "act_embed"))
        return x_BxSxD


class QFormerAdapter(nn.Module):
    """The BLIP-2 adapter: learned ``query_tokens``, the ``qformer`` and a ``language_projection``.

    Image features ``[B, P, E]`` (+ optional instruction tokens) -> LLM inputs ``[B, Q, out_features]``.
    The Q-Former runs in f32 whatever ``dtype`` is, as HF keeps it (its LayerNorm eps is 1e-12).

    ``itc_embed_dim > 0`` adds BLIP-2's stage-1 parts, named as HF ``Blip2ForImageTextRetrieval``'s
    top level: text ``embeddings``, ``vision_projection`` / ``text_projection`` (to the ITC space),
    ``itm_head`` (2-way), and the ITC temperature ``temp`` (LAVIS's; HF does not store it).
    ``mllm_jax.models.blip2_stage1`` uses them through ``encode``.
    """

    config: QFormerConfig
    num_queries: int = 32
    out_features: int = 64
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    itc_embed_dim: int = 0
    attention: AttentionKernel = AttentionKernel()

    def setup(self):
        c = self.config
        self.query_tokens = self.param(
            "query_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, self.num_queries, c.hidden_size),
        )
        self.qformer = QFormer(c, jnp.float32, self.remat, self.attention)
        self.language_projection = Dense(self.out_features, ("mlp", "embed"), dtype=self.dtype)
        if self.itc_embed_dim:
            if c.text_input or not c.text_ffn:
                raise ValueError(
                    "BLIP-2 stage-1 heads (itc_embed_dim > 0) need a Q-Former with text_ffn=True and "
                    f"text_input=False, got text_ffn={c.text_ffn}, text_input={c.text_input}"
                )
            self.embeddings = QFormerTextEmbeddings(c, jnp.float32)
            self.vision_projection = Dense(self.itc_embed_dim, ("embed", None))
            self.text_projection = Dense(self.itc_embed_dim, ("embed", None))
            self.itm_head = Dense(2, ("embed", None))
            self.temp = self.param(
                "temp", nn.with_logical_partitioning(nn.initializers.constant(INIT_TEMP), ()), ()
            )

    def _queries(self, b: int, q: int):
        tokens = self.query_tokens[:, :q].astype(jnp.float32)
        return jnp.broadcast_to(tokens, (b, q, self.config.hidden_size))

    def __call__(self, image_BxPxE, text_BxT=None, text_mask_BxT=None):
        b = image_BxPxE.shape[0]
        hidden = self.qformer(
            self._queries(b, self.num_queries), image_BxPxE.astype(jnp.float32), text_BxT, text_mask_BxT
        )
        out = hidden[:, : self.num_queries]
        if self.itc_embed_dim and self.is_initializing():  # stage-1 heads exist from init on
            self.embeddings(jnp.zeros((1, 1), jnp.int32))
            self.itm_head(out), self.text_projection(out), self.vision_projection(out)
        out = self.language_projection(out.astype(self.dtype))
        return constrain(out, ("act_batch", "act_seq", "act_embed"))

    def encode(self, image_BxPxE=None, text_BxT=None, text_mask_BxT=None, mask_mode="bi"):
        """Stage 1: the Q-Former over ``[queries (if an image is given); text (if given)]``.

        Returns hidden states ``[B, S, D]``, S = Q + T (``Q = 0`` without an image) under ``mask_mode`` (a
        ``MASK_MODES`` name, or a tuple of one per example).
        """
        if not self.itc_embed_dim:
            raise ValueError("this BLIP-2 has no stage-1 heads (itc_embed_dim=0)")
        if image_BxPxE is None and text_BxT is None:
            raise ValueError("encode needs an image, a text or both")
        b = (image_BxPxE if image_BxPxE is not None else text_BxT).shape[0]
        q = self.num_queries if image_BxPxE is not None else 0
        text_embeds = None if text_BxT is None else self.embeddings(text_BxT)
        image = None if image_BxPxE is None else image_BxPxE.astype(jnp.float32)
        return self.qformer(
            self._queries(b, q),
            image,
            None,
            text_mask_BxT,
            text_embeds_BxTxD=text_embeds,
            mask_mode=mask_mode,
        )
