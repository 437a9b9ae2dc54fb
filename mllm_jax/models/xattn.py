"""Flamingo gated cross-attention: text tokens attend to image features inside the LLM.

A block is ``x + tanh(alpha_xattn) * xattn(norm(x), media)`` then ``x + tanh(alpha_dense) * mlp(norm(x))``,
exactly HF's ``IdeficsGatedCrossAttentionLayer``. With the alphas at zero (the default init) the block is
the identity, so inserting blocks into a pretrained LLM leaves its outputs unchanged until training opens
the gates.

Media masking: ``media_mask_BxTxN[b, t, n]`` says whether text token ``t`` may see image ``n`` (IDEFICS's
``image_attention_mask``: the latest image at or before the token). A token that may see no image gets
a zero cross-attention output (HF's ``cross_attention_gate``); the dense branch is not gated by it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.models.layers import Dense, RMSNorm, activation, attention, constrain

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


def expand_media_mask(media_mask_BxTxN, tokens_per_image: int):
    """``[B, T, N]`` per-image permissions -> (``mask [B, 1, T, N*S]``, ``gate [B, T]``).

    Rows that may see no image get an all-True mask: their attention output is discarded by the gate,
    and a fully masked softmax row would only risk NaNs (and NaN gradients) for nothing.
    """
    allowed_BxTxN = media_mask_BxTxN.astype(bool)
    gate_BxT = allowed_BxTxN.any(axis=-1)
    allowed_BxTxN = allowed_BxTxN | ~gate_BxT[..., None]
    mask_BxTxK = jnp.repeat(allowed_BxTxN, tokens_per_image, axis=-1)
    return mask_BxTxK[:, None], gate_BxT


class CrossAttention(nn.Module):
    config: XattnConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, media_BxKxE, mask_Bx1xTxK):
        c = self.config
        b, t, _ = x_BxTxD.shape
        width = c.num_heads * c.head_dim
        q = Dense(width, ("embed", "heads"), False, self.dtype, name="q_proj")(x_BxTxD)
        k = Dense(width, ("embed", "heads"), False, self.dtype, name="k_proj")(media_BxKxE)
        v = Dense(width, ("embed", "heads"), False, self.dtype, name="v_proj")(media_BxKxE)
        q_BxTxNxH = q.reshape(b, t, c.num_heads, c.head_dim)
        k_BxKxNxH = k.reshape(b, -1, c.num_heads, c.head_dim)
        v_BxKxNxH = v.reshape(b, -1, c.num_heads, c.head_dim)
        if c.qk_layer_norms:
            q_BxTxNxH = RMSNorm(c.rms_norm_eps, self.dtype, name="q_layer_norm")(q_BxTxNxH)
            k_BxKxNxH = RMSNorm(c.rms_norm_eps, self.dtype, name="k_layer_norm")(k_BxKxNxH)
        q_BxTxNxH = constrain(q_BxTxNxH, ("act_batch", "act_seq", "act_heads", None))
        out = attention(q_BxTxNxH, k_BxKxNxH, v_BxKxNxH, mask_Bx1xTxK, dtype=self.dtype)
        return Dense(c.hidden_size, ("heads", "embed"), False, self.dtype, name="o_proj")(
            out.reshape(b, t, width)
        )


class XattnMlp(nn.Module):
    config: XattnConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = Dense(c.intermediate_size, ("embed", "mlp"), False, self.dtype, name="gate_proj")(x)
        up = Dense(c.intermediate_size, ("embed", "mlp"), False, self.dtype, name="up_proj")(x)
        h = constrain(activation(c.act)(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), False, self.dtype, name="down_proj")(h)


class GatedCrossAttention(nn.Module):
    """``x [B, T, D]``, media ``[B, N, S, E]`` (N images of S tokens), ``media_mask [B, T, N]``
    -> ``[B, T, D]``.

    ``media=None`` means no images: only the (ungated by media) dense branch acts, as in HF with an
    all-zero ``image_attention_mask``.
    """

    config: XattnConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, media_BxNxSxE=None, media_mask_BxTxN=None):
        c = self.config
        b, t, _ = x_BxTxD.shape
        if media_BxNxSxE is None:  # a single dummy image nobody may see: params exist, output is gated off
            media_BxNxSxE = jnp.zeros((b, 1, 1, c.kv_dim), self.dtype)
            media_mask_BxTxN = jnp.zeros((b, t, 1), bool)
        if media_mask_BxTxN is None:
            raise ValueError("gated cross-attention needs media_mask [B, T, N] together with the media")
        _, n, s, e = media_BxNxSxE.shape
        if media_mask_BxTxN.shape != (b, t, n):
            raise ValueError(f"media_mask must be {(b, t, n)} for {n} images, got {media_mask_BxTxN.shape}")
        mask_Bx1xTxK, gate_BxT = expand_media_mask(media_mask_BxTxN, s)
        param = lambda name: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(_alpha_init(c), (None,) * len(c.alpha_shape)), c.alpha_shape
        )
        alpha_xattn, alpha_dense = param("alpha_cross_attn"), param("alpha_dense")

        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x_BxTxD)
        media_BxKxE = media_BxNxSxE.reshape(b, n * s, e).astype(self.dtype)
        h = CrossAttention(c, self.dtype, name="cross_attn")(h, media_BxKxE, mask_Bx1xTxK)
        h = jnp.where(gate_BxT[..., None], h, jnp.zeros((), h.dtype))
        x_BxTxD = x_BxTxD + jnp.tanh(alpha_xattn).astype(self.dtype) * h

        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x_BxTxD)
        h = XattnMlp(c, self.dtype, name="mlp")(h)
        x_BxTxD = x_BxTxD + jnp.tanh(alpha_dense).astype(self.dtype) * h
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed"))


def latest_image_mask(tokens_BxT, image_token_id: int, num_images: int, eod_token_id: int | None = None):
    """IdeficsProcessor's ``image_attention_mask`` computed from token ids: bool ``[B, T, N]``.

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
