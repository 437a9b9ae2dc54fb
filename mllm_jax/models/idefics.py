"""Flamingo family (IDEFICS v1 layout): CLIP vision tower -> optional Perceiver resampler -> gated
cross-attention blocks inserted into a LLaMA decoder.

Images do not become tokens: each text token reads the images it may see (``image_mask [B, T, M]``, the
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

import jax.numpy as jnp

from mllm_jax.models.layers import Dense, RMSNorm, Stack, constrain, maybe_remat
from mllm_jax.models.llm import DecoderLayer, LlmConfig, chunk_mask, token_table
from mllm_jax.models.mllm import MultimodalLM, per_image
from mllm_jax.models.perceiver import Perceiver, PerceiverConfig
from mllm_jax.models.scan import layer_stack
from mllm_jax.models.vit import VisionTower, VitConfig
from mllm_jax.models.xattn import GatedCrossAttention, XattnConfig, latest_image_mask, own_media


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


class IdeficsAdapter(Stack):
    """Perceiver + gated cross-attention blocks (the ``adapter`` collection)."""

    config: IdeficsConfig

    def setup(self):
        c = self.config
        if c.use_resampler:
            self.perceiver = Perceiver(c.perceiver, self.dtype, self.attention)
        block = maybe_remat(GatedCrossAttention, self.remat)
        self.xattn = [
            block(c.xattn, self.dtype, self.attention, name=f"xattn_{j}") for j in range(c.num_xattn_layers)
        ]

    def resample(self, feats):
        """``[B, P, E]`` (an image) or ``[B, F, P, E]`` (a clip) -> media ``[B, tokens_per_image, E]``."""
        return self.perceiver(feats) if self.config.use_resampler else feats

    def cross_attend(self, j: int, x_BxTxD, media_BxMxPxE, media_mask_BxTxM):
        return self.xattn[j](x_BxTxD, media_BxMxPxE, media_mask_BxTxM)


class IdeficsDecoder(Stack):
    """LLaMA decoder pieces with IDEFICS's decoupled embeddings (the ``llm`` collection)."""

    config: IdeficsConfig

    def setup(self):
        c, lc = self.config, self.config.llm
        self.embed_tokens = token_table(lc.vocab_size, lc.hidden_size, self.dtype)
        if c.additional_vocab_size:
            self.additional_embedding = token_table(c.additional_vocab_size, lc.hidden_size, self.dtype)
        layer = maybe_remat(DecoderLayer, self.remat)
        self.layers = layer_stack(layer, lc.num_layers, False, (), lc, self.dtype, self.attention)
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


class Idefics(MultimodalLM, Stack):
    """``__call__(tokens, images, ...) -> (logits_BxTxV, cache)`` with V = vocab + additional vocab.

    For decoding, compute ``media`` once, then call ``decode`` per chunk with the same media and each
    chunk's rows of the image mask; the KV cache (``models.llm.init_cache(config.llm, ...)``) holds the
    self-attention layers only: the cross-attention K/V over the media are recomputed each step.
    ``remat`` applies to the vision, decoder and gated blocks; no layer scan (the gated blocks sit between
    the decoder layers).
    """

    config: IdeficsConfig

    def setup(self):
        c = self.config
        self.vision = VisionTower(c.vision, self.dtype, self.remat, attention=self.attention)
        self.adapter = IdeficsAdapter(c, self.dtype, self.remat, self.attention)
        self.llm = IdeficsDecoder(c, self.dtype, self.remat, self.attention)

    def media(self, images_BxIxYxXxC):
        """``[B, I, Y, X, C]`` pixels -> media ``[B, M, P, E]`` (P = tokens_per_image, E = media_dim):
        M = I images, or M = I / frames_per_clip clips (a clip's frames consecutive)."""
        f = self.config.frames_per_clip
        b, i = images_BxIxYxXxC.shape[:2]
        if i % f:
            raise ValueError(f"{i} images is not a whole number of {f}-frame clips")
        hidden_states, _ = self.vision(per_image(images_BxIxYxXxC))
        feats = hidden_states[-1]
        if f > 1:  # the perceiver reads a clip's frames at once, frame embeddings added
            feats = feats.reshape(b * i // f, f, *feats.shape[1:])
        feats = self.adapter.resample(feats)
        return feats.reshape(b, i // f, *feats.shape[1:])

    def embed(self, tokens_BxT, images_BxIxYxXxC=None):
        """Token embeddings only: images reach the LLM through ``decode``'s media, not the sequence
        (``images`` is accepted so prefix-family callers can stay generic)."""
        del images_BxIxYxXxC
        return self.llm.embed(tokens_BxT)

    def inputs(self, tokens_BxT, images_BxIxYxXxC=None, image_mask_BxTxM=None):
        """``image_mask [B, T, M]`` as IdeficsProcessor's ``image_attention_mask``; when omitted it is
        derived from the tokens (``config.image_token_id`` / ``eod_token_id``)."""
        c = self.config
        media = None
        if images_BxIxYxXxC is not None and images_BxIxYxXxC.shape[1] > 0:
            media = self.media(images_BxIxYxXxC)
            if image_mask_BxTxM is None:
                if c.image_token_id is None:
                    raise ValueError("pass image_mask [B, T, M] or set config.image_token_id to derive it")
                image_mask_BxTxM = latest_image_mask(
                    tokens_BxT, c.image_token_id, media.shape[1], c.eod_token_id
                )
        return self.embed(tokens_BxT), (media, image_mask_BxTxM)

    def decode(
        self,
        embeds_BxTxD,
        positions_BxT=None,
        attention_mask_BxT=None,
        cache=None,
        cache_index_B=None,
        *media,
    ):
        """As ``Llm.__call__`` (same cache and mask rules), plus ``media``: ``(media_BxMxPxE,
        media_mask_BxTxM)``, the media and which of them each token may see (``inputs``' decode args).
        No media, or None: text only (the gated blocks still apply their dense branch)."""
        c = self.config
        media_BxMxPxE, media_mask_BxTxM = (*media, None, None)[:2]
        b, t, _ = embeds_BxTxD.shape
        if self.is_initializing():  # init from embeddings alone must still create every parameter
            self.embed(jnp.zeros((1, 1), jnp.int32))
        if self.is_initializing() and media_BxMxPxE is None:
            v = c.vision
            self.media(jnp.zeros((1, c.frames_per_clip, v.image_size, v.image_size, v.num_channels)))
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = chunk_mask(b, t, attention_mask_BxT, cache, cache_index_B)
        if cache is None and attention_mask_BxT is not None and media_mask_BxTxM is not None:
            media_mask_BxTxM = own_media(media_mask_BxTxM, attention_mask_BxT)  # packed: own images
        x = embeds_BxTxD.astype(self.dtype)
        new_cache = []
        for i in range(c.llm.num_layers):
            if i % c.cross_layer_interval == 0:
                x = self.adapter.cross_attend(i // c.cross_layer_interval, x, media_BxMxPxE, media_mask_BxTxM)
            x, layer_cache = self.llm.layer(
                i, x, positions_BxT, mask, None if cache is None else cache[i], cache_index_B
            )
            new_cache.append(layer_cache)
        return self.llm.head(x), (None if cache is None else tuple(new_cache))
