"""Multimodal composites. LLaVA ("prefix" family): vision tower -> projector -> features spliced
into the token embeddings at the ``<image>`` positions -> decoder LLM.

Params have exactly three top-level collections, ``vision``, ``adapter`` and ``llm``: freezing,
learning-rate groups, sharding and HF conversion all address them by path.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import ScanStack
from mllm_jax.models.llm import Llm, LlmConfig
from mllm_jax.models.projector import Projector, ProjectorConfig
from mllm_jax.models.vit import VisionTower, VitConfig, select_features

SELECT_STRATEGIES = ("default", "full")

# video_pool -> how a clip's per-frame features [B, M, F, P, D] become media blocks (LLaVA, BLIP-2)
VIDEO_POOLS = {
    "concat": lambda x: x.reshape(x.shape[0], -1, *x.shape[3:]),  # each frame its own block
    # one block per clip; averaged in f32 so bf16 features do not lose the small frame differences
    "mean": lambda x: x.astype(jnp.float32).mean(axis=2).astype(x.dtype),
}


def pool_clips(feats_BxIxPxD, frames_per_clip: int, video_pool: str):
    """Per-frame features ``[B, I, P, D]`` (I = clips * F, a clip's F frames consecutive) -> media blocks
    ``[B, M, P, D]``: M = I for "concat", M = clips for "mean"."""
    b, i = feats_BxIxPxD.shape[:2]
    if i % frames_per_clip:
        raise ValueError(f"{i} images is not a whole number of {frames_per_clip}-frame clips")
    x_BxMxFxPxD = feats_BxIxPxD.reshape(b, i // frames_per_clip, frames_per_clip, *feats_BxIxPxD.shape[2:])
    return VIDEO_POOLS[video_pool](x_BxMxFxPxD)


def check_video(config) -> None:
    """``frames_per_clip`` / ``video_pool`` of a LLaVA or BLIP-2 config."""
    if config.frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be >= 1, got {config.frames_per_clip}")
    if config.video_pool not in VIDEO_POOLS:
        raise ValueError(f"video_pool must be one of {sorted(VIDEO_POOLS)}, got {config.video_pool!r}")


def per_image(images_BxIxYxXxC):
    """``[B, I, Y, X, C] -> [B·I, Y, X, C]``: what a vision tower takes."""
    return images_BxIxYxXxC.reshape(-1, *images_BxIxYxXxC.shape[2:])


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VitConfig = VitConfig()
    projector: ProjectorConfig = ProjectorConfig()
    llm: LlmConfig = LlmConfig()
    image_token_id: int = 255
    vision_feature_layers: tuple[int, ...] = (-2,)
    vision_feature_select_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    # Video: the images axis holds clips of frames_per_clip consecutive frames; video_pool (VIDEO_POOLS)
    # says whether each frame keeps its own block ("concat", the same model as images) or a clip's
    # frames are averaged into one block ("mean").
    frames_per_clip: int = 1
    video_pool: str = "concat"

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_positions - int(self.vision_feature_select_strategy == "default")

    @property
    def frames_per_media(self) -> int:
        """Images (frames) per block of image tokens in the sequence."""
        return self.frames_per_clip if self.video_pool == "mean" else 1

    def validate(self):
        check_video(self)
        self.vision.validate()
        self.projector.validate()
        self.llm.validate()
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, got "
                f"{self.vision_feature_select_strategy!r}"
            )
        n = self.vision.num_layers
        for layer in self.vision_feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"vision_feature_layer {layer} out of range for a {n}-layer vision tower")
        want = self.vision.hidden_size * len(self.vision_feature_layers)
        if self.projector.in_features != want or self.projector.out_features != self.llm.hidden_size:
            raise ValueError(
                f"projector maps {self.projector.in_features}->{self.projector.out_features}, the "
                f"model needs {want}->{self.llm.hidden_size}"
            )


def splice_images(embeds_BxTxD, tokens_BxT, image_token_id, features_BxMPxD):
    """Put the k-th image feature of each sample at that sample's k-th ``<image>`` token.

    Same order as HF's ``masked_scatter`` when each sample's images belong to it. Features beyond
    the number of image tokens (padding images) are ignored.
    """
    is_image_BxT = tokens_BxT == image_token_id
    idx_BxT = jnp.clip(jnp.cumsum(is_image_BxT, axis=1) - 1, 0, features_BxMPxD.shape[1] - 1)
    gathered = jnp.take_along_axis(features_BxMPxD, idx_BxT[..., None], axis=1)
    return jnp.where(is_image_BxT[..., None], gathered.astype(embeds_BxTxD.dtype), embeds_BxTxD)


class MultimodalLM(nn.Module):
    """The interface every family shares, so ``generate`` and training drive them one way: ``embed``
    (tokens and images -> LLM inputs), ``decode`` (the LLM over them, with a cache) and ``__call__``
    (both). This base is the prefix families' (LLaVA, BLIP-2): each image's ``image_features``
    replace its ``<image>`` tokens; ``embed``'s keywords go on to ``image_features``."""

    def image_features(self, images_BxIxYxXxC):
        raise NotImplementedError

    def media_blocks(self, feats_BIxPxD, b: int):
        """Per-image features ``[B·I, P, D]`` -> the sequence's rows ``[B, MP, D]`` (``pool_clips``)."""
        c = self.config
        blocks = pool_clips(
            feats_BIxPxD.reshape(b, -1, *feats_BIxPxD.shape[1:]), c.frames_per_media, c.video_pool
        )
        return blocks.reshape(b, -1, blocks.shape[-1])

    def embed(self, tokens_BxT, images_BxIxYxXxC=None, **feature_kwargs):
        embeds = self.llm.embed(tokens_BxT)
        if images_BxIxYxXxC is None or images_BxIxYxXxC.shape[1] == 0:
            return embeds
        features = self.image_features(images_BxIxYxXxC, **feature_kwargs)
        return splice_images(embeds, tokens_BxT, self.config.image_token_id, features)

    def inputs(self, tokens_BxT, images_BxIxYxXxC=None, **kwargs):
        """``(embeds, decode_args)``: the LLM inputs, and what ``decode`` takes after the cache index."""
        return self.embed(tokens_BxT, images_BxIxYxXxC, **kwargs), ()

    def decode(
        self, embeds_BxTxD, positions_BxT=None, attention_mask_BxT=None, cache=None, cache_index_B=None
    ):
        return self.llm(embeds_BxTxD, positions_BxT, attention_mask_BxT, cache, cache_index_B)

    def __call__(
        self,
        tokens_BxT,
        images_BxIxYxXxC=None,
        positions_BxT=None,
        attention_mask_BxT=None,
        cache=None,
        cache_index_B=None,
        **kwargs,
    ):
        """Returns ``(logits_BxTxV, cache)``; ``kwargs`` are the family's own inputs (``inputs``)."""
        embeds, decode_args = self.inputs(tokens_BxT, images_BxIxYxXxC, **kwargs)
        return self.decode(embeds, positions_BxT, attention_mask_BxT, cache, cache_index_B, *decode_args)


class Llava(MultimodalLM, ScanStack):
    """LLaVA; ``remat`` and ``scan_layers`` apply to the vision and LLM layers."""

    config: LlavaConfig

    def setup(self):
        c = self.config
        self.vision = VisionTower(c.vision, self.dtype, self.remat, self.scan_layers, self.attention)
        self.adapter = Projector(c.projector, self.dtype)
        self.llm = Llm(c.llm, self.dtype, self.remat, self.scan_layers, self.attention)

    def image_features(self, images_BxIxYxXxC):
        """``[B, I, Y, X, C]`` -> projected features ``[B, MP, D_llm]``, P = ``tokens_per_image``,
        M = I, or the number of clips when ``video_pool`` is "mean"."""
        c = self.config
        hidden_states, _ = self.vision(per_image(images_BxIxYxXxC))
        feats = select_features(
            hidden_states, c.vision_feature_layers, c.vision_feature_select_strategy == "default"
        )
        return self.media_blocks(self.adapter(feats), images_BxIxYxXxC.shape[0])
