"""Flamingo as IDEFICS lays it out: a CLIP tower, a Perceiver resampler, gated cross-attention blocks
inside a LLaMA decoder; each image is one ``<image>`` token between ``<fake_token_around_image>``s, and
the text after it reads its media through the gates (``IdeficsForVisionText2Text``)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mllm_jax.data import templates
from mllm_jax.data.layouts import ModelSpec
from mllm_jax.errors import UsageError
from mllm_jax.families import base
from mllm_jax.families.trainable import ModelSettings, TrainableFamily, llm_sizes
from mllm_jax.hf import idefics as hf_idefics
from mllm_jax.models import flops
from mllm_jax.models.idefics import Idefics, IdeficsConfig
from mllm_jax.models.layers import AttentionKernel
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.perceiver import PerceiverConfig
from mllm_jax.models.vit import VitConfig
from mllm_jax.models.xattn import XattnConfig

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"  # IDEFICS wraps each image in these
END_OF_UTTERANCE = "<end_of_utterance>"  # IDEFICS-instruct closes each turn with it


@dataclasses.dataclass(frozen=True, kw_only=True)
class IdeficsSettings(ModelSettings):
    family: str = "idefics"
    # PerceiverConfig fields (embed_dim: the tower's), XattnConfig fields (widths: the LLM's and the media's)
    perceiver: dict = dataclasses.field(default_factory=dict)
    xattn: dict = dataclasses.field(default_factory=dict)
    use_resampler: bool = True  # False: the vision tokens go straight to the gated blocks
    cross_layer_interval: int = 1  # a gated block before every n-th decoder layer (IDEFICS-9B: 4)
    # frames_per_clip > 1: each clip is resampled, with frame embeddings, into one media item


class IdeficsFamily(TrainableFamily):
    name = "idefics"
    attention_map = "cross_attention"  # predict --explain
    config_cls = IdeficsConfig
    settings_cls = IdeficsSettings
    module_cls = Idefics
    hf_types = {"idefics": hf_idefics}
    tied_keys = ("lm_head.weight", "lm_head.additional_fc.weight")
    starts_from_parts = True
    special_tokens = (FAKE_IMAGE_TOKEN, base.IMAGE_TOKEN)
    nested_text_config = False  # IDEFICS keeps the decoder's fields at the top level of its config
    reads_media = True

    def build(self, config, dtype=jnp.float32, remat="none", scan_layers=False, attention=AttentionKernel()):
        # the gated blocks sit between decoder layers: no layer scan for this family
        return Idefics(config, dtype=dtype, remat=remat, attention=attention)

    def scans_layers(self, module) -> bool:
        return False

    def frames_per_media(self, config: IdeficsConfig) -> int:
        return config.frames_per_media

    # -- sizing from config.model

    def scratch(self, m: IdeficsSettings, tokenizer) -> IdeficsConfig:
        return _config(m, VitConfig(**m.vision), LlmConfig(**llm_sizes(m, tokenizer)), tokenizer, 0)

    def from_parts(self, m: IdeficsSettings, vision: VitConfig, llm: LlmConfig, tokenizer) -> IdeficsConfig:
        # As IDEFICS: the tokens added for images live in a separate, trainable table (`additional_*`)
        # so that the pretrained vocabulary can stay frozen.
        return _config(m, vision, llm, tokenizer, max(0, len(tokenizer) - llm.vocab_size))

    def processor(self, config: IdeficsConfig, tokenizer, image_processor, qformer_tokenizer=None):
        from transformers import IdeficsImageProcessor, IdeficsProcessor

        size = config.vision.image_size
        ip = IdeficsImageProcessor(
            image_size=size,
            image_mean=list(image_processor.image_mean),
            image_std=list(image_processor.image_std),
        )
        return IdeficsProcessor(ip, tokenizer, image_size=size)

    def model_spec(self, config: IdeficsConfig, tokenizer) -> ModelSpec:
        return ModelSpec(
            config.image_token_id,
            1,
            layout="wrapped",
            around_token_id=base.token_id(tokenizer, FAKE_IMAGE_TOKEN),
            frames_per_image=config.frames_per_media,
        )

    def flops_per_sequence(self, c: IdeficsConfig, seq_len: int, images: int = 1) -> float:
        """The decoder, the vision tower and perceiver per image, and the gated cross-attention blocks
        (queries over the text, keys/values over every image's media tokens)."""
        p = c.perceiver
        inner = p.num_heads * p.head_dim
        context = c.vision.num_positions + p.num_latents
        perceiver = 0.0
        if c.use_resampler:
            per_block = (
                2 * p.embed_dim * inner * (p.num_latents + context)
                + 2 * p.embed_dim * p.mlp_dim * p.num_latents
            )
            perceiver = 6.0 * p.depth * per_block * images
        x = c.xattn
        inner = x.num_heads * x.head_dim
        media = c.tokens_per_image * images
        per_xattn = (
            2 * x.hidden_size * inner * seq_len  # q and o over the text
            + 2 * x.kv_dim * inner * media  # k and v over the media
            + 3 * x.hidden_size * x.intermediate_size * seq_len  # the gated dense branch
            + 2 * seq_len * media * inner  # scores and weighted sum
        )
        return (
            flops.decoder_flops(c.llm, seq_len)
            + flops.vision_flops(c.vision, images)
            + perceiver
            + 6.0 * c.num_xattn_layers * per_xattn
        )

    # -- inference

    def prepare_inputs(self, config: IdeficsConfig, assets: str, prompt: str, images) -> base.Inputs:
        """IdeficsProcessor's interleaved layout: the prompt split at each ``<image>`` is the list
        ``[text, image, text, ...]`` the processor takes; the images are resized as its image processor
        does. (IdeficsProcessor itself needs torch tensors, which are no runtime dependency here.)"""
        base.check_placeholders(prompt, base.IMAGE_TOKEN, images)
        tokenizer = base.load_tokenizer(assets)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (base.IMAGE_TOKEN, FAKE_IMAGE_TOKEN)}
        if tokenizer.unk_token_id in ids.values():
            raise UsageError(f"{assets}: the tokenizer lacks IDEFICS's tokens {sorted(ids)}")
        # which image each token sees follows from the image tokens and the end of document (IdeficsProcessor)
        config = dataclasses.replace(
            config, image_token_id=ids[base.IMAGE_TOKEN], eod_token_id=tokenizer.eos_token_id
        )
        spec = ModelSpec(config.image_token_id, 1, layout="wrapped", around_token_id=ids[FAKE_IMAGE_TOKEN])
        tokens = templates.encode_text(tokenizer, prompt, spec).tolist()
        if not images:
            return base.Inputs(tokenizer, tokens, config=config)
        image_spec = base.image_spec_of_assets(assets)
        return base.Inputs(
            tokenizer, tokens, np.stack([image_spec(im) for im in images])[None], config=config
        )

    def chat_prompt(self, config, turns, eos="</s>") -> str:
        """IDEFICS-instruct's conversation format: each turn's texts and images in their order, an
        utterance closed by ``<end_of_utterance>``::

            [SYSTEM\\n]User: QUESTION<image><end_of_utterance>\\nAssistant: ANSWER<end_of_utterance>\\n
            User:<image>QUESTION<end_of_utterance>\\nAssistant:
        """
        out = []
        for role, parts in turns:
            body = "".join(base.IMAGE_TOKEN if p is None else p for p in parts)
            space = " " if parts and parts[0] is not None else ""
            speaker = {"user": "User:", "assistant": "Assistant:"}.get(role)
            out.append(f"{speaker}{space}{body}{END_OF_UTTERANCE}\n" if speaker else f"{body}\n")
        return "".join(out) + "Assistant:"


def _config(
    m: IdeficsSettings, vision: VitConfig, llm: LlmConfig, tokenizer, additional: int
) -> IdeficsConfig:
    frames = m.frames_per_clip
    perceiver = PerceiverConfig(embed_dim=vision.hidden_size, **m.perceiver)
    if frames > 1 and perceiver.max_frames < frames:  # a clip's frames need their embeddings
        perceiver = dataclasses.replace(perceiver, max_frames=frames)
    media_dim = perceiver.embed_dim if m.use_resampler else vision.hidden_size
    xattn = XattnConfig(hidden_size=llm.hidden_size, kv_dim=media_dim, **m.xattn)
    return IdeficsConfig(
        vision,
        perceiver,
        xattn,
        llm,
        use_resampler=m.use_resampler,
        cross_layer_interval=m.cross_layer_interval,
        additional_vocab_size=additional,
        image_token_id=base.token_id(tokenizer, base.IMAGE_TOKEN),
        eod_token_id=tokenizer.eos_token_id,  # IdeficsProcessor's end of document
        frames_per_clip=frames,
    )


FAMILY = IdeficsFamily()
