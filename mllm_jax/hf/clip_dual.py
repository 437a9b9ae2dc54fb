"""CLIPModel and SiglipModel (a text half, a vision half and the contrastive heads) read as their vision
tower: what stock repos such as openai/clip-vit-large-patch14-336 (LLaVA-1.5's tower) or
google/siglip-so400m-patch14-384 hold, used as ``config.model.init.vision``. Only the vision half is
read (``vision_model.*``, the keys of ``clip.rules``); an export writes a CLIPVisionModel /
SiglipVisionModel.
"""

from __future__ import annotations

from mllm_jax.hf import clip
from mllm_jax.models.vit import VitConfig

# model_type of the dual model -> that of its vision half
VISION_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
ALIASES = clip.ALIASES
# what a vision tower leaves behind: the text half and the contrastive heads
SKIP = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")


def vision_config(d: dict) -> dict:
    """The vision half's HF config (older CLIP configs also carry a ``vision_config_dict`` that wins)."""
    v = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
    return {**v, "model_type": VISION_TYPES[d["model_type"]]}


def base_config(d: dict) -> dict:
    """The HF config an export of the tower (or of a model built on it) starts from."""
    return vision_config(d)


def config_from_hf(d: dict) -> VitConfig:
    return clip.config_from_hf(vision_config(d))


def rules(c: VitConfig) -> list:
    return clip.rules(c)
