"""Perceiver resampler (Flamingo / IDEFICS): a fixed set of learned latents reads a variable number of
image (or video frame) features and returns ``num_latents`` vectors per image.

Each block is cross-attention of the latents over ``concat(features, latents)`` (Flamingo concatenates the
latents to the keys so they can also exchange information among themselves) followed by an MLP, both
residual. The parameter tree mirrors HF's ``IdeficsPerceiverResampler`` (``blocks.i.0`` is ``attn``,
``blocks.i.1`` is ``mlp``), see ``mllm_jax.hf.idefics``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import (
    Block,
    LayerNorm,
    Part,
    activation,
    attention,
    constrain,
    merge_heads,
    mlp,
    split_heads,
)


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    embed_dim: int = 64  # width of the input features and of the latents (IDEFICS: the vision width)
    num_latents: int = 8  # IDEFICS-9B: 64
    depth: int = 2  # IDEFICS-9B: 6
    num_heads: int = 4  # IDEFICS-9B: 16
    head_dim: int = 16  # IDEFICS-9B: 96 (num_heads * head_dim need not equal embed_dim)
    mlp_dim: int = 256  # IDEFICS: 4 * vision width
    act: str = "relu"  # IDEFICS: ReLU; OpenFlamingo: GELU
    qk_layer_norms: bool = False  # IDEFICS `qk_layer_norms_perceiver`: LayerNorm over each head of q, k
    layer_norm_eps: float = 1e-5
    # > 0: a learned embedding per frame index is added before the frames of one clip are flattened into a
    # single context (OpenFlamingo's `frame_embs`), so T frames are resampled into one set of latents.
    # 0 (IDEFICS): no time embeddings; frame inputs are still accepted and simply concatenated.
    max_frames: int = 0
    # Init scale of the latents (IDEFICS: 1). Unit-scale latents swamp what the images add to the residual
    # stream, which a from-scratch model is slow to overcome; tiny starts them small.
    latents_init_std: float = 1.0
    # Init scale of the q and k projections (0: the N(0, 0.02) of every other kernel). With 0.02 the
    # attention logits start near 0, so every latent reads the mean of the image (docs/flamingo.md).
    qk_init_std: float = 0.0
    # Init of the scale of the LayerNorm on the image features (IDEFICS: 1). The latents are keys too, and
    # at 1 they take most of the attention and of what is read (the same for every image); larger, the
    # image tokens do (docs/flamingo.md).
    context_norm_init: float = 1.0

    def validate(self):
        for name in ("embed_dim", "num_latents", "depth", "num_heads", "head_dim", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"perceiver {name} must be >= 1, got {getattr(self, name)}")
        if self.latents_init_std < 0 or self.qk_init_std < 0:
            raise ValueError(
                f"perceiver latents_init_std and qk_init_std must be >= 0, got {self.latents_init_std}, "
                f"{self.qk_init_std}"
            )
        if self.context_norm_init <= 0:
            raise ValueError(f"perceiver context_norm_init must be > 0, got {self.context_norm_init}")
        if self.max_frames < 0:
            raise ValueError(f"perceiver max_frames must be >= 0, got {self.max_frames}")
        activation(self.act)


class _Projection(nn.Module):
    """``Dense`` without bias whose kernel starts at ``N(0, std)`` (same param tree as ``Dense``)."""

    features: int
    std: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(self.std)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, ("embed", "heads")), (x.shape[-1], self.features)
        )
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


def _qk_heads(c: PerceiverConfig, name: str, x_BxTxD, dtype):
    if not c.qk_init_std:
        return split_heads(x_BxTxD, name, c.num_heads, c.head_dim, False, dtype)
    y = _Projection(c.num_heads * c.head_dim, c.qk_init_std, dtype, name=name)(x_BxTxD)
    return y.reshape(*x_BxTxD.shape[:-1], c.num_heads, c.head_dim)


class PerceiverAttention(Block):
    """Latents attend to ``concat(context, latents)``; no biases (as in the Perceiver/Flamingo papers)."""

    config: PerceiverConfig

    @nn.compact
    def __call__(self, context_BxPxD, latents_BxQxD):
        c = self.config
        ln = lambda name: LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        context_norm = LayerNorm(
            c.layer_norm_eps, dtype=self.dtype, scale_init=c.context_norm_init, name="context_layer_norm"
        )
        context_BxPxD = context_norm(context_BxPxD)
        latents_BxQxD = ln("latents_layer_norm")(latents_BxQxD)
        kv_BxSxD = jnp.concatenate([context_BxPxD, latents_BxQxD], axis=1)  # S = P + Q keys
        heads = lambda name, x: split_heads(x, name, c.num_heads, c.head_dim, False, self.dtype)  # noqa: E731
        q_BxQxNxH = _qk_heads(c, "q_proj", latents_BxQxD, self.dtype)
        k_BxSxNxH = _qk_heads(c, "k_proj", kv_BxSxD, self.dtype)
        v_BxSxNxH = heads("v_proj", kv_BxSxD)
        if c.qk_layer_norms:
            q_BxQxNxH = ln("q_layer_norm")(q_BxQxNxH)
            k_BxSxNxH = ln("k_layer_norm")(k_BxSxNxH)
        out = attention(q_BxQxNxH, k_BxSxNxH, v_BxSxNxH, dtype=self.dtype, kernel=self.attention)
        return merge_heads(out, "output_proj", c.embed_dim, False, self.dtype)


class PerceiverBlock(Block):
    config: PerceiverConfig

    @nn.compact
    def __call__(self, context_BxPxD, latents_BxQxD):
        c = self.config
        attn = PerceiverAttention(c, self.dtype, self.attention, name="attn")
        latents_BxQxD = latents_BxQxD + attn(context_BxPxD, latents_BxQxD)
        latents_BxQxD = latents_BxQxD + PerceiverMlp(c, self.dtype, name="mlp")(latents_BxQxD)
        return constrain(latents_BxQxD, ("act_batch", "act_seq", "act_embed"))


class PerceiverMlp(Part):
    config: PerceiverConfig

    @nn.compact
    def __call__(self, x_BxQxD):
        c = self.config
        h = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="ln")(x_BxQxD)
        return mlp(h, c.mlp_dim, c.embed_dim, c.act, False, self.dtype, ("fc", "c_proj"))


class Perceiver(Block):
    """Features ``[B, P, D]`` (one image each) or ``[B, F, P, D]`` (F frames of one clip, read as one
    context of F·P tokens) -> latents ``[B, Q, D]``, Q = ``num_latents``."""

    config: PerceiverConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        if x.ndim == 4:
            b, f, p, d = x.shape
            if c.max_frames:
                if f > c.max_frames:
                    raise ValueError(f"{f} frames given, the perceiver embeds at most {c.max_frames}")
                frame_emb = self.param(
                    "frame_embedding",
                    nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                    (c.max_frames, d),
                )
                x = x + frame_emb[:f, None].astype(x.dtype)[None]
            x = x.reshape(b, f * p, d)
        if x.ndim != 3 or x.shape[-1] != c.embed_dim:
            raise ValueError(
                f"perceiver expects [B, P, {c.embed_dim}] or [B, F, P, {c.embed_dim}], got {x.shape}"
            )
        context_BxPxD = constrain(x.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        latents = self.param(
            "latents",
            nn.with_logical_partitioning(nn.initializers.normal(c.latents_init_std), (None, "embed")),
            (c.num_latents, c.embed_dim),
        )
        latents_BxQxD = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0], *latents.shape))
        for i in range(c.depth):
            block = PerceiverBlock(c, self.dtype, self.attention, name=f"blocks_{i}")
            latents_BxQxD = block(context_BxPxD, latents_BxQxD)
        return LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(latents_BxQxD)
