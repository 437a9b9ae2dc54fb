"""LLaVA: a CLIP/SigLIP tower, a linear or MLP projector, a LLaMA-family decoder; each image becomes
``tokens_per_image`` image tokens in place of its ``<image>`` (``LlavaForConditionalGeneration``)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mllm_jax.data.layouts import ModelSpec
from mllm_jax.errors import ConfigError, UsageError
from mllm_jax.families import base
from mllm_jax.families.trainable import ModelSettings, TrainableFamily, llm_sizes, video_settings
from mllm_jax.hf import llava as hf_llava
from mllm_jax.models import flops
from mllm_jax.models.layers import AttentionKernel
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import Llava, LlavaConfig
from mllm_jax.models.projector import ProjectorConfig
from mllm_jax.models.retrieval import RET_TOKEN, RetrievalConfig, RetrievalLlava, RetrievalLlavaConfig
from mllm_jax.models.vit import VitConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlavaSettings(ModelSettings):
    family: str = "llava"
    projector: dict = dataclasses.field(default_factory=lambda: {"depth": 2, "act": "gelu"})  # mlp2x_gelu
    vision_feature_layers: tuple[int, ...] = (-2,)  # concatenated when several
    vision_feature_select_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    # video: "concat" (a block of image tokens per frame) or "mean" (one averaged block per clip)
    video_pool: str = "concat"
    # FROMAGe's [RET] retrieval head (models/retrieval.py): RetrievalConfig's fields (dim, weight,
    # temperature); empty: none. Needs [RET] in the tokenizer (synthetic.retrieval_captions adds it)
    retrieval: dict = dataclasses.field(default_factory=dict)


class LlavaFamily(TrainableFamily):
    name = "llava"
    config_cls = LlavaConfig
    settings_cls = LlavaSettings
    module_cls = Llava
    hf_types = {"llava": hf_llava}
    tied_keys = ("language_model.lm_head.weight",)
    starts_from_parts = True
    special_tokens = (base.IMAGE_TOKEN,)
    image_mode = "crop"  # CLIPImageProcessor: shortest edge, then center crop
    grows_vocab = True  # <image> grows the LLM's tables, as LLaVA's HF conversion

    def pack_refusal(self, m: LlavaSettings) -> str:
        if m.retrieval:  # the contrastive loss pairs a row's [RET] with that row's first image
            return "config.model.retrieval pairs each row's [RET] token with the row's first image"
        return super().pack_refusal(m)

    def frames_per_media(self, config: LlavaConfig) -> int:
        return config.frames_per_media

    # -- the [RET] retrieval head (a RetrievalLlavaConfig), an option of the same family

    def build(self, config, dtype=jnp.float32, remat="none", scan_layers=False, attention=AttentionKernel()):
        module = RetrievalLlava if isinstance(config, RetrievalLlavaConfig) else Llava
        return module(config, dtype=dtype, remat=remat, scan_layers=scan_layers, attention=attention)

    def config_from_dict(self, d: dict):
        return base.config_from_dict(RetrievalLlavaConfig if "retrieval" in d else LlavaConfig, d)

    # -- sizing from config.model

    def scratch(self, m: LlavaSettings, tokenizer) -> LlavaConfig:
        return self.from_parts(m, VitConfig(**m.vision), LlmConfig(**llm_sizes(m, tokenizer)), tokenizer)

    def from_parts(self, m: LlavaSettings, vision: VitConfig, llm: LlmConfig, tokenizer) -> LlavaConfig:
        layers = m.vision_feature_layers
        projector = ProjectorConfig(vision.hidden_size * len(layers), llm.hidden_size, **m.projector)
        config = LlavaConfig(
            vision,
            projector,
            llm,
            base.token_id(tokenizer, base.IMAGE_TOKEN),
            layers,
            m.vision_feature_select_strategy,
            **video_settings(m),
        )
        if not m.retrieval:
            return config
        if RET_TOKEN not in tokenizer.get_vocab():
            raise ConfigError(
                f"config.model.retrieval needs the {RET_TOKEN} token in the tokenizer: "
                "set config.synthetic.retrieval_captions=True (built-in tokenizer)"
            )
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LlavaConfig)}
        ret = RetrievalConfig(**{**m.retrieval, "token_id": base.token_id(tokenizer, RET_TOKEN)})
        return RetrievalLlavaConfig(**fields, retrieval=ret)

    def processor(self, config: LlavaConfig, tokenizer, image_processor, qformer_tokenizer=None):
        from transformers import LlavaProcessor

        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.vision.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_token=base.IMAGE_TOKEN,
            num_additional_image_tokens=int(config.vision.class_token),
        )

    def model_spec(self, config: LlavaConfig, tokenizer) -> ModelSpec:
        return ModelSpec(
            config.image_token_id, config.tokens_per_image, frames_per_image=config.frames_per_media
        )

    def flops_per_sequence(self, c: LlavaConfig, seq_len: int, images: int = 1) -> float:
        """Training FLOPs of one sequence of ``seq_len`` tokens with ``images`` images, counting the
        vision tower and projector as trained (an upper bound for stages that freeze them)."""
        p = c.projector
        projector_params = p.in_features * p.out_features + (p.depth - 1) * p.out_features**2
        projector = 6.0 * projector_params * c.tokens_per_image * images
        return flops.decoder_flops(c.llm, seq_len) + flops.vision_flops(c.vision, images) + projector

    # -- inference

    def prepare_inputs(self, config: LlavaConfig, assets: str, prompt: str, images) -> base.Inputs:
        """LlavaProcessor: each ``<image>`` becomes the image's feature tokens, in place."""
        processor = base.load_processor(assets)
        base.check_placeholders(prompt, processor.image_token, images)
        inputs = processor(images=images or None, text=prompt, return_tensors="np")
        tokens = inputs["input_ids"][0].tolist()
        if not images:
            return base.Inputs(processor.tokenizer, tokens)
        expected = config.tokens_per_image * len(images)
        got = sum(t == config.image_token_id for t in tokens)
        if got != expected:
            raise UsageError(
                f"the processor produced {got} image tokens, the model expects {expected} "
                f"({config.tokens_per_image} per image); check the processor config"
            )
        return base.Inputs(processor.tokenizer, tokens, base.to_nhwc(inputs["pixel_values"]))


FAMILY = LlavaFamily()
