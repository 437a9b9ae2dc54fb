"""A CLIP or SigLIP vision tower on its own (``CLIPVisionModel``, ``SiglipVisionModel``): what
``config.model.init.vision`` points at; it is imported and exported, never trained alone."""

from __future__ import annotations

import numpy as np

from mllm_jax.families.base import Family
from mllm_jax.hf import clip, clip_dual
from mllm_jax.models.vit import VisionTower, VitConfig


class VitFamily(Family):
    name = "vit"
    config_cls = VitConfig
    module_cls = VisionTower
    hf_types = {
        "clip_vision_model": clip,
        "siglip_vision_model": clip,
        "clip": clip_dual,
        "siglip": clip_dual,
    }

    def vision_config(self, config: VitConfig) -> VitConfig:
        return config

    def example_inputs(self, config: VitConfig) -> tuple:
        return (np.zeros((1, config.image_size, config.image_size, config.num_channels), np.float32),)

    def config_to_hf(self, config: VitConfig, base: dict | None = None) -> dict:
        ours = clip.config_to_hf(config)
        ours["architectures"] = [clip.TOWERS[ours["model_type"]]["architecture"]]
        return super()._merged(base, ours)


FAMILY = VitFamily()
