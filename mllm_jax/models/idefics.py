"""Flamingo family (IDEFICS v1 layout): CLIP vision tower -> optional Perceiver resampler -> gated
cross-attention blocks inserted into a LLaMA decoder.

Images do not become tokens: each text token reads the images it may see (``image_mask [B, L, N]``, the
latest image at or before it) through the gated cross-attention block that runs before decoder layer
``i`` whenever ``i % cross_layer_interval == 0`` (IDEFICS's placement; OpenFlamingo's ``(i + 1) % n``
differs).

Params, by top-level collection (what Flamingo freezes and what it trains):
  ``vision``  the CLIP tower (``VisionTower`` tree; IDEFICS reads its last hidden state, no post-LN).
  ``adapter`` everything Flamingo adds between frozen vision and frozen LM: ``perceiver`` (when
              ``use_resampler``) and the gated blocks ``xattn_{j}``, j = i // cross_layer_interval.
  ``llm``     the LLaMA decoder, same names as ``Llm`` (``embed_tokens``, ``layers_{i}``, ``norm``,
              ``lm_head``) plus the decoupled extra vocabulary ``additional_embedding`` / ``additional_fc``
              (IDEFICS trains new tokens such as ``<image>`` while the base table stays frozen).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import Dense, RMSNorm, causal_mask, constrain, maybe_remat
from mllm_jax.models.llm import DecoderLayer, LlmConfig
from mllm_jax.models.perceiver import Perceiver, PerceiverConfig
from mllm_jax.models.vit import VisionTower, VitConfig
from mllm_jax.models.xattn import GatedCrossAttention, XattnConfig, latest_image_mask


@dataclasses.dataclass(frozen=True)
class IdeficsConfig:
    vision: VitConfig = VitConfig(act="gelu")
    perceiver: PerceiverConfig = PerceiverConfig()
    xattn: XattnConfig = XattnConfig()
    llm: LlmConfig = LlmConfig(num_kv_heads=4)
    use_resampler: bool = True  # False: the vision tokens go straight to the cross-attention
    cross_layer_interval: int = 1
    additional_vocab_size: int = 0  # ids vocab_size .. vocab_size + additional - 1 (IDEFICS-9B: 2)
    # Only needed when no image mask is passed: the mask is then derived from the tokens (processor rule).
    image_token_id: int | None = None
    eod_token_id: int | None = None
    # Video (Flamingo): the images axis holds clips of frames_per_clip consecutive frames; each clip's
    # frames are resampled together, with the perceiver's frame embeddings (perceiver.max_frames >=
    # frames_per_clip), into one media item: one <image> token per clip. 1: images, as IDEFICS.
    frames_per_clip: int = 1

    @property
    def frames_per_media(self) -> int:
        """Images (frames) per media item, i.e. per ``<image>`` token."""
        return self.frames_per_clip

    @property
    def num_xattn_layers(self) -> int:
        return self.llm.num_layers // self.cross_layer_interval

    @property
    def total_vocab_size(self) -> int:
        return self.llm.vocab_size + self.additional_vocab_size

    @property
    def media_dim(self) -> int:
        return self.perceiver.embed_dim if self.use_resampler else self.vision.hidden_size

    @property
    def tokens_per_image(self) -> int:
        return self.perceiver.num_latents if self.use_resampler else self.vision.num_positions

    def validate(self):
        self.vision.validate()
        self.perceiver.validate()
        self.xattn.validate()
        self.llm.validate()
        if self.cross_layer_interval < 1 or self.llm.num_layers % self.cross_layer_interval:
            # HF builds num_layers // interval blocks but visits ceil(num_layers / interval) of them
            raise ValueError(
                f"cross_layer_interval {self.cross_layer_interval} must divide "
                f"num_layers {self.llm.num_layers}"
            )
        if self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")
        if self.frames_per_clip > 1 and not (
            self.use_resampler and self.perceiver.max_frames >= self.frames_per_clip
        ):
            raise ValueError(
                f"frames_per_clip {self.frames_per_clip} needs use_resampler and perceiver.max_frames >= "
                f"{self.frames_per_clip} (the frame embeddings), got {self.use_resampler} and "
                f"{self.perceiver.max_frames}"
            )
        if self.additional_vocab_size < 0:
            raise ValueError(f"additional_vocab_size must be >= 0, got {self.additional_vocab_size}")
        if self.use_resampler and self.perceiver.embed_dim != self.vision.hidden_size:
            raise ValueError(
                f"perceiver embed_dim {self.perceiver.embed_dim} != vision width {self.vision.hidden_size}"
            )
        if self.xattn.kv_dim != self.media_dim:
            raise ValueError(f"cross-attention kv_dim {self.xattn.kv_dim} != media width {self.media_dim}")
        if self.xattn.hidden_size != self.llm.hidden_size:
            raise ValueError(
                f"cross-attention width {self.xattn.hidden_size} != LLM width {self.llm.hidden_size}"
            )


class IdeficsAdapter(nn.Module):
    """Perceiver + gated cross-attention blocks (the ``adapter`` collection)."""

    config: IdeficsConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    def setup(self):
        c = self.config
        if c.use_resampler:
            self.perceiver = Perceiver(c.perceiver, self.dtype)
        block = maybe_remat(GatedCrossAttention, self.remat)
        self.xattn = [block(c.xattn, self.dtype, name=f"xattn_{j}") for j in range(c.num_xattn_layers)]

    def resample(self, feats):
        """``[B, S, E]`` (an image) or ``[B, T, S, E]`` (a clip) -> media ``[B, tokens_per_image, E]``."""
        return self.perceiver(feats) if self.config.use_resampler else feats

    def cross_attend(self, j: int, x_BxTxD, media_BxNxSxE, media_mask_BxTxN):
        return self.xattn[j](x_BxTxD, media_BxNxSxE, media_mask_BxTxN)


class IdeficsDecoder(nn.Module):
    """LLaMA decoder pieces with IDEFICS's decoupled embeddings (the ``llm`` collection)."""

    config: IdeficsConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    def setup(self):
        c, lc = self.config, self.config.llm
        embed = lambda n: nn.Embed(  # noqa: E731
            n,
            lc.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        self.embed_tokens = embed(lc.vocab_size)
        if c.additional_vocab_size:
            self.additional_embedding = embed(c.additional_vocab_size)
        layer = maybe_remat(DecoderLayer, self.remat)
        self.layers = [layer(lc, self.dtype, name=f"layers_{i}") for i in range(lc.num_layers)]
        self.norm = RMSNorm(lc.rms_norm_eps, self.dtype)
        if not lc.tie_embeddings:
            self.lm_head = Dense(lc.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)
            if c.additional_vocab_size:
                self.additional_fc = Dense(
                    c.additional_vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype
                )

    def embed(self, tokens_BxT):
        c = self.config
        v = c.llm.vocab_size
        ids = jnp.clip(tokens_BxT, 0, c.total_vocab_size - 1)
        x = self.embed_tokens(jnp.where(ids < v, ids, 0))
        if c.additional_vocab_size:
            extra = self.additional_embedding(jnp.clip(ids - v, 0, c.additional_vocab_size - 1))
            x = jnp.where((ids >= v)[..., None], extra, x)
        return constrain(x, ("act_batch", "act_seq", "act_embed"))

    def layer(self, i: int, x_BxTxD, positions_BxT, mask, cache=None, cache_index_B=None):
        return self.layers[i](x_BxTxD, positions_BxT, mask, cache, cache_index_B)

    def head(self, x_BxTxD):
        c = self.config
        x_BxTxD = self.norm(x_BxTxD)
        if c.llm.tie_embeddings:
            logits = self.embed_tokens.attend(x_BxTxD)
            extra = self.additional_embedding.attend(x_BxTxD) if c.additional_vocab_size else None
        else:
            logits = self.lm_head(x_BxTxD)
            extra = self.additional_fc(x_BxTxD) if c.additional_vocab_size else None
        if extra is not None:
            logits = jnp.concatenate([logits, extra], axis=-1)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))


class Idefics(nn.Module):
    """``__call__(tokens, images, ...) -> (logits_BxLxV, cache)`` with V = vocab + additional vocab.

    For decoding, compute ``media`` once, then call ``decode`` per chunk with the same media and each
    chunk's rows of the image mask; the KV cache (``models.llm.init_cache(config.llm, ...)``) holds the
    self-attention layers only: the cross-attention K/V over the media are recomputed each step.
    """

    config: IdeficsConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # a layers.REMAT_POLICIES name, for vision, decoder and gated blocks

    def setup(self):
        c = self.config
        self.vision = VisionTower(c.vision, self.dtype, self.remat)
        self.adapter = IdeficsAdapter(c, self.dtype, self.remat)
        self.llm = IdeficsDecoder(c, self.dtype, self.remat)

    def media(self, images_BxNxHxWxC):
        """``[B, N, H, W, C]`` pixels -> media ``[B, M, tokens_per_image, media_dim]``: M = N images, or
        M = N / frames_per_clip clips (a clip's frames consecutive)."""
        t = self.config.frames_per_clip
        b, n = images_BxNxHxWxC.shape[:2]
        if n % t:
            raise ValueError(f"{n} images is not a whole number of {t}-frame clips")
        hidden_states, _ = self.vision(images_BxNxHxWxC.reshape(b * n, *images_BxNxHxWxC.shape[2:]))
        feats = hidden_states[-1]
        if t > 1:  # the perceiver reads a clip's frames at once, frame embeddings added
            feats = feats.reshape(b * n // t, t, *feats.shape[1:])
        feats = self.adapter.resample(feats)
        return feats.reshape(b, n // t, *feats.shape[1:])

    def embed(self, tokens_BxL, images_BxNxHxWxC=None):
        """Token embeddings only: images reach the LLM through ``decode``'s media, not the sequence
        (``images`` is accepted so prefix-family callers can stay generic)."""
        del images_BxNxHxWxC
        return self.llm.embed(tokens_BxL)

    def decode(
        self,
        embeds_BxLxD,
        positions_BxL=None,
        attention_mask_BxL=None,
        cache=None,
        cache_index_B=None,
        media_BxNxSxE=None,
        media_mask_BxLxN=None,
    ):
        """As ``Llm.__call__`` (same cache and mask rules), plus the media and which image each
        token may see. ``media=None``: text only (gated blocks still apply their dense branch)."""
        c = self.config
        b, t, _ = embeds_BxLxD.shape
        if self.is_initializing():  # init from embeddings alone must still create every parameter
            self.embed(jnp.zeros((1, 1), jnp.int32))
        if self.is_initializing() and media_BxNxSxE is None:
            self.media(
                jnp.zeros(
                    (1, c.frames_per_clip, c.vision.image_size, c.vision.image_size, c.vision.num_channels)
                )
            )
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(t), (b, t))
        if cache is None:
            idx = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = causal_mask(idx, idx, attention_mask_BxL)
        else:
            s = cache[0][0].shape[1]
            mask = causal_mask(
                cache_index_B[:, None] + jnp.arange(t)[None], jnp.broadcast_to(jnp.arange(s), (b, s))
            )
        x = embeds_BxLxD.astype(self.dtype)
        new_cache = []
        for i in range(c.llm.num_layers):
            if i % c.cross_layer_interval == 0:
                x = self.adapter.cross_attend(i // c.cross_layer_interval, x, media_BxNxSxE, media_mask_BxLxN)
            x, layer_cache = self.llm.layer(
                i, x, positions_BxL, mask, None if cache is None else cache[i], cache_index_B
            )
            new_cache.append(layer_cache)
        return self.llm.head(x), (None if cache is None else tuple(new_cache))

    def __call__(
        self,
        tokens_BxL,
        images_BxNxHxWxC=None,
        positions_BxL=None,
        attention_mask_BxL=None,
        cache=None,
        cache_index_B=None,
        image_mask_BxLxN=None,
    ):
        """``image_mask [B, L, N]`` as IdeficsProcessor's ``image_attention_mask``; when omitted it is
        derived from the tokens (``config.image_token_id`` / ``eod_token_id``)."""
        c = self.config
        media = None
        if images_BxNxHxWxC is not None and images_BxNxHxWxC.shape[1] > 0:
            media = self.media(images_BxNxHxWxC)
            if image_mask_BxLxN is None:
                if c.image_token_id is None:
                    raise ValueError("pass image_mask [B, L, N] or set config.image_token_id to derive it")
                image_mask_BxLxN = latest_image_mask(
                    tokens_BxL, c.image_token_id, media.shape[1], c.eod_token_id
                )
        embeds = self.embed(tokens_BxL)
        return self.decode(
            embeds, positions_BxL, attention_mask_BxL, cache, cache_index_B, media, image_mask_BxLxN
        )
