"""How each model family trains from a run config: its config from sizes or from pretrained parts,
its module, how images sit in the token sequence, the HF processor saved with it, and its FLOPs.

One ``Recipe`` per family in ``RECIPES``; ``setup.RunSetup`` reads ``config.model.family`` and
never branches on family names itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from mllm_jax.data import pipeline
from mllm_jax.errors import ConfigError
from mllm_jax.models import flops
from mllm_jax.models.blip2 import Blip2, Blip2Config
from mllm_jax.models.eva import EvaConfig
from mllm_jax.models.idefics import Idefics, IdeficsConfig
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import Llava, LlavaConfig
from mllm_jax.models.opt import OptConfig
from mllm_jax.models.perceiver import PerceiverConfig
from mllm_jax.models.projector import ProjectorConfig
from mllm_jax.models.qformer import QFormerConfig
from mllm_jax.models.vit import VitConfig
from mllm_jax.models.xattn import XattnConfig

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"  # IDEFICS wraps each image in these


def _token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def llm_sizes(m: dict, tokenizer) -> dict:
    """``model.llm`` with the vocab size: the tokenizer's, unless the config names a larger one (the
    7B/13B presets name LLaMA's 32000, so that they build at their real size with no tokenizer dir)."""
    sizes = {"vocab_size": len(tokenizer), **m["llm"]}
    if sizes["vocab_size"] < len(tokenizer):
        raise ConfigError(
            f"config.model.llm.vocab_size {sizes['vocab_size']} < the tokenizer's {len(tokenizer)} tokens"
        )
    return sizes


def _video(m: dict) -> dict:
    """LLaVA / BLIP-2 clip settings (``model.frames_per_clip`` / ``model.video_pool``; absent: images)."""
    return dict(frames_per_clip=int(m.get("frames_per_clip", 1)), video_pool=m.get("video_pool", "concat"))


# ---------------------------------------------------------------- LLaVA


def llava_scratch(m: dict, tokenizer) -> LlavaConfig:
    vision = VitConfig(**m["vision"])
    llm = LlmConfig(**llm_sizes(m, tokenizer))
    layers = tuple(m["vision_feature_layers"])
    projector = ProjectorConfig(vision.hidden_size * len(layers), llm.hidden_size, **m["projector"])
    return LlavaConfig(
        vision,
        projector,
        llm,
        _token_id(tokenizer, IMAGE_TOKEN),
        layers,
        m["vision_feature_select_strategy"],
        **_video(m),
    )


def llava_from_parts(m: dict, vision, llm_config: LlmConfig, tokenizer) -> LlavaConfig:
    layers = tuple(m["vision_feature_layers"])
    projector = ProjectorConfig(vision.hidden_size * len(layers), llm_config.hidden_size, **m["projector"])
    return LlavaConfig(
        vision,
        projector,
        llm_config,
        _token_id(tokenizer, IMAGE_TOKEN),
        layers,
        m["vision_feature_select_strategy"],
        **_video(m),
    )


def llava_processor(config: LlavaConfig, tokenizer, image_processor):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(config.vision.class_token),
    )


def llava_model_spec(config: LlavaConfig, tokenizer) -> pipeline.ModelSpec:
    return pipeline.ModelSpec(
        config.image_token_id, config.tokens_per_image, frames_per_image=config.frames_per_media
    )


# ---------------------------------------------------------------- Flamingo (IDEFICS layout)


def _idefics_config(m: dict, vision: VitConfig, llm: LlmConfig, tokenizer, additional: int) -> IdeficsConfig:
    frames = int(m.get("frames_per_clip", 1))
    perceiver = PerceiverConfig(embed_dim=vision.hidden_size, **m["perceiver"])
    if frames > 1 and perceiver.max_frames < frames:  # a clip's frames need their embeddings
        perceiver = dataclasses.replace(perceiver, max_frames=frames)
    media_dim = perceiver.embed_dim if m["use_resampler"] else vision.hidden_size
    xattn = XattnConfig(hidden_size=llm.hidden_size, kv_dim=media_dim, **m["xattn"])
    return IdeficsConfig(
        vision,
        perceiver,
        xattn,
        llm,
        use_resampler=bool(m["use_resampler"]),
        cross_layer_interval=int(m["cross_layer_interval"]),
        additional_vocab_size=additional,
        image_token_id=_token_id(tokenizer, IMAGE_TOKEN),
        eod_token_id=tokenizer.eos_token_id,  # IdeficsProcessor's end of document
        frames_per_clip=frames,
    )


def idefics_scratch(m: dict, tokenizer) -> IdeficsConfig:
    vision = VitConfig(**m["vision"])
    llm = LlmConfig(**llm_sizes(m, tokenizer))
    return _idefics_config(m, vision, llm, tokenizer, additional=0)


def idefics_from_parts(m: dict, vision, llm_config: LlmConfig, tokenizer) -> IdeficsConfig:
    # As IDEFICS: the tokens added for images live in a separate, trainable table (`additional_*`)
    # so that the pretrained vocabulary can stay frozen.
    additional = max(0, len(tokenizer) - llm_config.vocab_size)
    return _idefics_config(m, vision, llm_config, tokenizer, additional)


def idefics_processor(config: IdeficsConfig, tokenizer, image_processor):
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    size = config.vision.image_size
    ip = IdeficsImageProcessor(
        image_size=size,
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
    )
    return IdeficsProcessor(ip, tokenizer, image_size=size)


def idefics_model_spec(config: IdeficsConfig, tokenizer) -> pipeline.ModelSpec:
    return pipeline.ModelSpec(
        config.image_token_id,
        1,
        layout="idefics",
        around_token_id=_token_id(tokenizer, FAKE_IMAGE_TOKEN),
        frames_per_image=config.frames_per_media,
    )


# ---------------------------------------------------------------- BLIP-2

BLIP2_LLMS = {"opt": OptConfig, "llm": LlmConfig}


def blip2_scratch(m: dict, tokenizer) -> Blip2Config:
    vision = EvaConfig(**m["vision"])
    qformer = QFormerConfig(encoder_hidden_size=vision.hidden_size, vocab_size=len(tokenizer), **m["qformer"])
    llm_type = m.get("llm_type", "opt")
    llm = BLIP2_LLMS[llm_type](**llm_sizes(m, tokenizer))
    return Blip2Config(
        vision,
        qformer,
        llm,
        num_query_tokens=int(m["num_query_tokens"]),
        image_token_id=_token_id(tokenizer, IMAGE_TOKEN),
        llm_type=llm_type,
        itc_embed_dim=int(m.get("itc_embed_dim", 0)),  # > 0: BLIP-2 stage-1 heads (ITC/ITM/ITG)
        dec_token_id=tokenizer.bos_token_id,  # ITG's [DEC]: the Q-Former shares the tokenizer here
        **_video(m),
    )


def blip2_processor(config: Blip2Config, tokenizer, image_processor, qformer_tokenizer=None):
    """Blip2Processor, or InstructBlipProcessor when the Q-Former reads the prompt (its tokenizer:
    ``qformer_tokenizer``, else the LLM's, as the from-scratch tiny models share one)."""
    from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor

    size = config.vision.image_size
    ip = BlipImageProcessor(
        size={"height": size, "width": size},
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
    )
    if config.qformer.text_input:
        qformer_tokenizer = qformer_tokenizer if qformer_tokenizer is not None else tokenizer
        return InstructBlipProcessor(
            ip, tokenizer, qformer_tokenizer, num_query_tokens=config.num_query_tokens
        )
    return Blip2Processor(ip, tokenizer, num_query_tokens=config.num_query_tokens)


def blip2_model_spec(config: Blip2Config, tokenizer) -> pipeline.ModelSpec:
    return pipeline.ModelSpec(
        config.image_token_id,
        config.tokens_per_image,
        layout="blip2",
        frames_per_image=config.frames_per_media,
    )


# ---------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str  # the family name checkpoints record (models.FAMILIES, hf.ARCHITECTURES)
    build: Callable  # (config, dtype, remat, scan_layers) -> module
    special_tokens: tuple[str, ...]  # added to the tokenizer when missing
    scratch: Callable  # (model config dict, tokenizer) -> config
    from_parts: Callable | None  # (model config dict, vision config, llm config, tokenizer) -> config
    processor: Callable  # (config, tokenizer, image processor) -> HF processor to save
    model_spec: Callable  # (config, tokenizer) -> pipeline.ModelSpec
    flops_per_sequence: Callable  # (config, seq_len, images) -> training FLOPs
    vision_family: str = "vit"  # the family of an `init.vision` directory
    image_mode: str = "resize"  # how its HF image processor fits images to the tower (ImageSpec.mode)
    nested_text_config: bool = True  # the HF config holds the decoder's fields under "text_config"
    # new tokens (<image>) grow the LLM's tables (LLaVA); False: they go to a separate table (IDEFICS)
    grows_vocab: bool = False


RECIPES = {
    "llava": Recipe(
        "llava",
        lambda c, dtype, remat, scan: Llava(c, dtype, remat, scan),
        (IMAGE_TOKEN,),
        llava_scratch,
        llava_from_parts,
        llava_processor,
        llava_model_spec,
        flops.llava_flops_per_sequence,
        image_mode="crop",  # CLIPImageProcessor: shortest edge, then center crop
        grows_vocab=True,
    ),
    "idefics": Recipe(
        "idefics",
        lambda c, dtype, remat, scan: Idefics(c, dtype, remat),
        (FAKE_IMAGE_TOKEN, IMAGE_TOKEN),
        idefics_scratch,
        idefics_from_parts,
        idefics_processor,
        idefics_model_spec,
        flops.idefics_flops_per_sequence,
        nested_text_config=False,
    ),
    "blip2": Recipe(
        "blip2",
        lambda c, dtype, remat, scan: Blip2(c, dtype, remat, scan),
        (IMAGE_TOKEN,),
        blip2_scratch,
        None,
        blip2_processor,
        blip2_model_spec,
        flops.blip2_flops_per_sequence,
    ),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
