"""Multimodal composites. LLaVA ("prefix" family): vision tower -> projector -> features spliced
into the token embeddings at the ``<image>`` positions -> decoder LLM.

Params have exactly three top-level collections, ``vision``, ``adapter`` and ``llm``: freezing,
learning-rate groups, sharding and HF conversion all address them by path.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.llm import Llm, LlmConfig
from mllm_jax.models.projector import Projector, ProjectorConfig
from mllm_jax.models.vit import VisionTower, VitConfig, select_features

SELECT_STRATEGIES = ("default", "full")

# video_pool -> how a clip's per-frame features [B, C, T, P, D] become media blocks (LLaVA, BLIP-2)
VIDEO_POOLS = {
    "concat": lambda x: x.reshape(x.shape[0], -1, *x.shape[3:]),  # each frame its own block
    # one block per clip; averaged in f32 so bf16 features do not lose the small frame differences
    "mean": lambda x: x.astype(jnp.float32).mean(axis=2).astype(x.dtype),
}


def pool_clips(feats_BxNxPxD, frames_per_clip: int, video_pool: str):
    """Per-frame features ``[B, N, P, D]`` (N = clips * T, a clip's frames consecutive) -> media blocks
    ``[B, M, P, D]``: M = N for "concat", M = clips for "mean"."""
    b, n = feats_BxNxPxD.shape[:2]
    if n % frames_per_clip:
        raise ValueError(f"{n} images is not a whole number of {frames_per_clip}-frame clips")
    x_BxCxTxPxD = feats_BxNxPxD.reshape(b, n // frames_per_clip, frames_per_clip, *feats_BxNxPxD.shape[2:])
    return VIDEO_POOLS[video_pool](x_BxCxTxPxD)


def check_video(config) -> None:
    """``frames_per_clip`` / ``video_pool`` of a LLaVA or BLIP-2 config."""
    if config.frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be >= 1, got {config.frames_per_clip}")
    if config.video_pool not in VIDEO_POOLS:
        raise ValueError(f"video_pool must be one of {sorted(VIDEO_POOLS)}, got {config.video_pool!r}")


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


def splice_images(embeds_BxLxD, tokens_BxL, image_token_id, features_BxMxD):
    """Put the k-th image feature of each sample at that sample's k-th ``<image>`` token.

    Same order as HF's ``masked_scatter`` when each sample's images belong to it. Features beyond
    the number of image tokens (padding images) are ignored.
    """
    is_image_BxL = tokens_BxL == image_token_id
    idx_BxL = jnp.clip(jnp.cumsum(is_image_BxL, axis=1) - 1, 0, features_BxMxD.shape[1] - 1)
    gathered = jnp.take_along_axis(features_BxMxD, idx_BxL[..., None], axis=1)
    return jnp.where(is_image_BxL[..., None], gathered.astype(embeds_BxLxD.dtype), embeds_BxLxD)


class Llava(nn.Module):
    config: LlavaConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # a layers.REMAT_POLICIES name, for the vision and LLM layers
    scan_layers: bool = False  # nn.scan over the vision and LLM layers (params stacked)

    def setup(self):
        c = self.config
        self.vision = VisionTower(c.vision, self.dtype, self.remat, self.scan_layers)
        self.adapter = Projector(c.projector, self.dtype)
        self.llm = Llm(c.llm, self.dtype, self.remat, self.scan_layers)

    def image_features(self, images_BxNxHxWxC):
        """``[B, N, H, W, C]`` -> projected features ``[B, M * tokens_per_image, D_llm]``, M = N, or the
        number of clips when ``video_pool`` is "mean"."""
        c = self.config
        b, n = images_BxNxHxWxC.shape[:2]
        hidden_states, _ = self.vision(images_BxNxHxWxC.reshape(b * n, *images_BxNxHxWxC.shape[2:]))
        feats = select_features(
            hidden_states, c.vision_feature_layers, c.vision_feature_select_strategy == "default"
        )
        projected = self.adapter(feats)
        blocks = pool_clips(projected.reshape(b, n, *projected.shape[1:]), c.frames_per_media, c.video_pool)
        return blocks.reshape(b, -1, blocks.shape[-1])

    def embed(self, tokens_BxL, images_BxNxHxWxC=None):
        embeds = self.llm.embed(tokens_BxL)
        if images_BxNxHxWxC is None or images_BxNxHxWxC.shape[1] == 0:
            return embeds
        return splice_images(
            embeds, tokens_BxL, self.config.image_token_id, self.image_features(images_BxNxHxWxC)
        )

    def decode(
        self, embeds_BxLxD, positions_BxL=None, attention_mask_BxL=None, cache=None, cache_index_B=None
    ):
        return self.llm(embeds_BxLxD, positions_BxL, attention_mask_BxL, cache, cache_index_B)

    def __call__(
        self,
        tokens_BxL,
        images_BxNxHxWxC=None,
        positions_BxL=None,
        attention_mask_BxL=None,
        cache=None,
        cache_index_B=None,
    ):
        """Returns ``(logits_BxLxV, cache)``."""
        embeds = self.embed(tokens_BxL, images_BxNxHxWxC)
        return self.decode(embeds, positions_BxL, attention_mask_BxL, cache, cache_index_B)
