"""Flamingo gated cross-attention: text tokens attend to image features inside the LLM.

A block is ``x + tanh(alpha_xattn) * xattn(norm(x), media)`` then ``x + tanh(alpha_dense) * mlp(norm(x))``,
exactly HF's ``IdeficsGatedCrossAttentionLayer``. With the alphas at zero (the default init) the block is
the identity, so inserting blocks into a pretrained LLM leaves its outputs unchanged until training opens
the gates.

Media masking: ``media_mask_BxTxM[b, t, m]`` says whether text token ``t`` may see image ``m`` (IDEFICS's
``image_attention_mask``: the latest image at or before the token; in packed rows only images of the
token's own example, ``own_media``). A token that may see no image gets
a zero cross-attention output (HF's ``cross_attention_gate``); the dense branch is not gated by it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models.layers import (
    Block,
    GatedMlp,
    RMSNorm,
    activation,
    attention,
    constrain,
    merge_heads,
    split_heads,
)

ALPHA_TYPES = ("float", "vector")
# HF `alpha_initializer` names; "normal", "gaussian" and "random" all mean N(0, alpha_init_std).
# "constant" (ours, for training from scratch): every gate starts at alpha_init_value; a from-scratch
# Flamingo whose gates start at exactly 0 can stay stuck at the no-image solution.
ALPHA_INITS = ("zeros", "ones", "normal", "gaussian", "random", "constant")


@dataclasses.dataclass(frozen=True)
class XattnConfig:
    hidden_size: int = 64  # the LLM width
    intermediate_size: int = 172
    num_heads: int = 4
    head_dim: int = 16
    kv_dim: int = 64  # width of the media features (vision tower or perceiver)
    act: str = "silu"
    rms_norm_eps: float = 1e-6
    qk_layer_norms: bool = False  # RMSNorm over each head of q and k (IDEFICS `qk_layer_norms`)
    alpha_type: str = "float"  # "float": one gate scalar, shape (1,); "vector": one per channel, (1, 1, D)
    alpha_init: str = "zeros"  # zeros keeps a pretrained LLM unchanged at init
    alpha_init_std: float = 0.0  # for the normal inits (HF `alphas_initializer_range`)
    alpha_init_value: float = 0.0  # for "constant"

    def validate(self):
        if self.alpha_type not in ALPHA_TYPES:
            raise ValueError(f"alpha_type must be one of {ALPHA_TYPES}, got {self.alpha_type!r}")
        if self.alpha_init not in ALPHA_INITS:
            raise ValueError(f"alpha_init must be one of {ALPHA_INITS}, got {self.alpha_init!r}")
        activation(self.act)

    @property
    def alpha_shape(self) -> tuple[int, ...]:
        return (1,) if self.alpha_type == "float" else (1, 1, self.hidden_size)


def _alpha_init(c: XattnConfig):
    if c.alpha_init == "zeros":
        return nn.initializers.zeros
    if c.alpha_init == "ones":
        return nn.initializers.ones
    if c.alpha_init == "constant":
        return nn.initializers.constant(c.alpha_init_value)
    return nn.initializers.normal(c.alpha_init_std)


def expand_media_mask(media_mask_BxTxM, tokens_per_image: int):
    """``[B, T, M]`` per-image permissions -> (``mask [B, 1, T, MP]``, ``gate [B, T]``).

    Rows that may see no image get an all-True mask: their attention output is discarded by the gate,
    and a fully masked softmax row would only risk NaNs (and NaN gradients) for nothing.
    """
    allowed_BxTxM = media_mask_BxTxM.astype(bool)
    gate_BxT = allowed_BxTxM.any(axis=-1)
    allowed_BxTxM = allowed_BxTxM | ~gate_BxT[..., None]
    mask_BxTxMP = jnp.repeat(allowed_BxTxM, tokens_per_image, axis=-1)
    return mask_BxTxMP[:, None], gate_BxT


class CrossAttention(Block):
    config: XattnConfig

    @nn.compact
    def __call__(self, x_BxTxD, media_BxSxE, mask_Bx1xTxS):
        c = self.config
        heads = lambda name, x: split_heads(x, name, c.num_heads, c.head_dim, False, self.dtype)  # noqa: E731
        q_BxTxNxH = heads("q_proj", x_BxTxD)
        k_BxSxNxH = heads("k_proj", media_BxSxE)
        v_BxSxNxH = heads("v_proj", media_BxSxE)
        if c.qk_layer_norms:
            q_BxTxNxH = RMSNorm(c.rms_norm_eps, self.dtype, name="q_layer_norm")(q_BxTxNxH)
            k_BxSxNxH = RMSNorm(c.rms_norm_eps, self.dtype, name="k_layer_norm")(k_BxSxNxH)
        q_BxTxNxH = constrain(q_BxTxNxH, ("act_batch", "act_seq", "act_heads", None))
        out = attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask_Bx1xTxS, self.dtype, kernel=self.attention)
        return merge_heads(out, "o_proj", c.hidden_size, False, self.dtype)


class GatedCrossAttention(Block):
    """``x [B, T, D]``, media ``[B, M, P, E]`` (M images or clips of P tokens), ``media_mask [B, T, M]``
    -> ``[B, T, D]``.

    ``media=None`` means no images: only the (ungated by media) dense branch acts, as in HF with an
    all-zero ``image_attention_mask``.
    """

    config: XattnConfig

    @nn.compact
    def __call__(self, x_BxTxD, media_BxMxPxE=None, media_mask_BxTxM=None):
        c = self.config
        b, t, _ = x_BxTxD.shape
        if media_BxMxPxE is None:  # a single dummy image nobody may see: params exist, output is gated off
            media_BxMxPxE = jnp.zeros((b, 1, 1, c.kv_dim), self.dtype)
            media_mask_BxTxM = jnp.zeros((b, t, 1), bool)
        if media_mask_BxTxM is None:
            raise ValueError("gated cross-attention needs media_mask [B, T, M] together with the media")
        _, m, p, e = media_BxMxPxE.shape
        if media_mask_BxTxM.shape != (b, t, m):
            raise ValueError(f"media_mask must be {(b, t, m)} for {m} images, got {media_mask_BxTxM.shape}")
        mask_Bx1xTxS, gate_BxT = expand_media_mask(media_mask_BxTxM, p)
        param = lambda name: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(_alpha_init(c), (None,) * len(c.alpha_shape)), c.alpha_shape
        )
        alpha_xattn, alpha_dense = param("alpha_cross_attn"), param("alpha_dense")

        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x_BxTxD)
        media_BxSxE = media_BxMxPxE.reshape(b, m * p, e).astype(self.dtype)  # S = M·P keys
        h = CrossAttention(c, self.dtype, self.attention, name="cross_attn")(h, media_BxSxE, mask_Bx1xTxS)
        h = jnp.where(gate_BxT[..., None], h, jnp.zeros((), h.dtype))
        x_BxTxD = x_BxTxD + jnp.tanh(alpha_xattn).astype(self.dtype) * h

        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x_BxTxD)
        h = GatedMlp(c.intermediate_size, c.act, False, self.dtype, name="mlp")(h)
        x_BxTxD = x_BxTxD + jnp.tanh(alpha_dense).astype(self.dtype) * h
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed"))


def own_media(media_mask_BxTxM, segments_BxT):
    """``media_mask`` restricted to each token's own segment (packed rows: ``chunk_mask``'s segment
    ids): an image belongs to the segment of the first token that may see it (its own image token);
    padding tokens (0) keep what they had, so a 0/1 attention mask changes nothing."""
    seg_BxT = segments_BxT.astype(jnp.int32)
    first_BxM = jnp.argmax(media_mask_BxTxM, axis=1)
    image_seg_BxM = jnp.take_along_axis(seg_BxT, first_BxM, axis=1)
    same_BxTxM = (seg_BxT[:, :, None] == image_seg_BxM[:, None, :]) | (seg_BxT[:, :, None] == 0)
    return media_mask_BxTxM.astype(bool) & same_BxTxM


def latest_image_mask(tokens_BxT, image_token_id: int, num_images: int, eod_token_id: int | None = None):
    """IdeficsProcessor's ``image_attention_mask`` computed from token ids: bool ``[B, T, M]``.

    Token ``t`` may see the latest ``<image>`` at or before it (the k-th image token is image ``k``), none
    before the first image, none after an end-of-document token until the next image (so packed documents
    do not see each other's images), and none if that image index is ``>= num_images``.
    """
    t = tokens_BxT.shape[1]
    pos_BxT = jnp.broadcast_to(jnp.arange(t), tokens_BxT.shape)
    is_image = tokens_BxT == image_token_id
    index_BxT = jnp.cumsum(is_image, axis=1) - 1
    last_image_BxT = jax.lax.cummax(jnp.where(is_image, pos_BxT, -1), axis=1)
    if eod_token_id is not None:
        # an EOD hides images from the tokens after it (not from itself), until the next image token
        last_eod_BxT = jax.lax.cummax(jnp.where(tokens_BxT == eod_token_id, pos_BxT, -1), axis=1)
        eod_before_BxT = jnp.pad(last_eod_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        index_BxT = jnp.where(last_image_BxT > eod_before_BxT, index_BxT, -1)
    index_BxT = jnp.where(index_BxT >= num_images, -1, index_BxT)
    return index_BxT[..., None] == jnp.arange(num_images)
