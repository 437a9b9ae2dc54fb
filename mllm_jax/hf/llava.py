"""LlavaForConditionalGeneration <-> ``Llava`` (vision tower + projector + any supported decoder)."""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf import clip, llama
from mllm_jax.hf.common import LINEAR, SAME, Rule, prefixed
from mllm_jax.models.mllm import LlavaConfig
from mllm_jax.models.projector import ProjectorConfig

# Older and in-memory layouts -> the canonical on-disk one (what transformers 5 save_pretrained writes).
ALIASES = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def config_from_hf(d: dict) -> LlavaConfig:
    vision = clip.config_from_hf({"model_type": "clip_vision_model", **d.get("vision_config", {})})
    llm = llama.config_from_hf({"model_type": "llama", **d.get("text_config", {})})
    layers = d.get("vision_feature_layer", -2)
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    projector = ProjectorConfig(
        in_features=vision.hidden_size * len(layers),
        out_features=llm.hidden_size,
        depth=2,
        act=d.get("projector_hidden_act", "gelu"),
        bias=d.get("multimodal_projector_bias", True),
    )
    config = LlavaConfig(
        vision=vision,
        projector=projector,
        llm=llm,
        image_token_id=d.get("image_token_index", 32000),
        vision_feature_layers=layers,
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
    )
    config.validate()
    return config


def config_to_hf(c: LlavaConfig, base: dict | None = None) -> dict:
    if c.projector.depth != 2:
        raise ConversionError(
            "HF LlavaForConditionalGeneration has a 2-layer projector; "
            f"this model's has depth {c.projector.depth}"
        )
    text_type = ((base or {}).get("text_config") or {}).get("model_type", "llama")
    layers = c.vision_feature_layers
    return dict(
        model_type="llava",
        architectures=["LlavaForConditionalGeneration"],
        vision_config=clip.config_to_hf(c.vision),
        text_config=llama.config_to_hf(c.llm, text_type),
        image_token_index=c.image_token_id,
        projector_hidden_act=c.projector.act,
        multimodal_projector_bias=c.projector.bias,
        vision_feature_layer=layers[0] if len(layers) == 1 else list(layers),
        vision_feature_select_strategy=c.vision_feature_select_strategy,
        image_seq_length=c.tokens_per_image,
        tie_word_embeddings=c.llm.tie_embeddings,
    )


def rules(c: LlavaConfig) -> list[Rule]:
    projector = []
    for i in (1, 2):
        projector.append(
            Rule(f"multi_modal_projector.linear_{i}.weight", f"adapter/linear_{i}/kernel", LINEAR)
        )
        if c.projector.bias:
            projector.append(Rule(f"multi_modal_projector.linear_{i}.bias", f"adapter/linear_{i}/bias", SAME))
    return (
        prefixed(clip.rules(c.vision), "vision_tower.", "vision/")
        + projector
        + prefixed(llama.rules(c.llm), "language_model.", "llm/")
    )
