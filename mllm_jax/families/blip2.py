"""BLIP-2 and InstructBLIP: an EVA tower, a Q-Former whose query outputs (projected) go in front of the
text, an OPT or LLaMA-family decoder; InstructBLIP's Q-Former also reads the instruction. Stage 1 trains
the Q-Former with ITC + ITM + ITG (loss ``qformer``, heads as ``Blip2ForImageTextRetrieval``)."""

from __future__ import annotations

import dataclasses
from types import ModuleType

import numpy as np

from mllm_jax.data.layouts import ModelSpec
from mllm_jax.errors import UsageError
from mllm_jax.families import base
from mllm_jax.families.trainable import ModelSettings, TrainableFamily, llm_sizes, video_settings
from mllm_jax.hf import blip2 as hf_blip2
from mllm_jax.hf import blip2_retrieval, instructblip
from mllm_jax.models import flops
from mllm_jax.models.blip2 import LLMS, Blip2, Blip2Config
from mllm_jax.models.eva import EvaConfig
from mllm_jax.models.qformer import QFormerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blip2Settings(ModelSettings):
    family: str = "blip2"
    qformer: dict = dataclasses.field(default_factory=dict)  # QFormerConfig fields; widths follow the tower
    num_query_tokens: int = 32
    llm_type: str = "opt"  # "opt" | "llm" (LLaMA family, as InstructBLIP-Vicuna)
    itc_embed_dim: int = 0  # > 0: BLIP-2 stage-1 heads (ITC / ITM / ITG)
    video_pool: str = "concat"  # as LLaVA's: "mean" averages a clip's query outputs
    qformer_tokenizer: str = ""  # the Q-Former's own (BERT) tokenizer dir; "": the LLM's

    def tokenizers(self) -> dict[str, str]:
        return {**super().tokenizers(), "qformer_tokenizer": self.qformer_tokenizer}


class Blip2Family(TrainableFamily):
    name = "blip2"
    attention_map = "qformer"  # predict --explain
    config_cls = Blip2Config
    settings_cls = Blip2Settings
    module_cls = Blip2
    hf_types = {
        "blip-2": hf_blip2,
        "instructblip": instructblip,
        blip2_retrieval.ARCHITECTURE: blip2_retrieval,  # model_type "blip-2" too: found by architecture
    }
    tied_keys = ("language_model.lm_head.weight",)
    special_tokens = (base.IMAGE_TOKEN,)
    losses = ("lm", "qformer")  # qformer: BLIP-2 stage 1 (ITC + ITM + ITG)

    def frames_per_media(self, config: Blip2Config) -> int:
        return config.frames_per_media

    def text_positions(self, config: Blip2Config) -> int:
        return config.qformer.max_positions if config.qformer.text_input else 0

    def hf_module(self, config: Blip2Config, base_config: dict) -> ModuleType:
        if blip2_retrieval.ARCHITECTURE in base_config.get("architectures", ()):  # stage 1, imported from HF
            return blip2_retrieval
        # InstructBLIP is BLIP-2 whose Q-Former also reads the instruction
        return instructblip if config.qformer.text_input else hf_blip2

    def complete_params(self, config, params: dict, module: ModuleType) -> dict:
        if module is blip2_retrieval:  # HF stores no ITC temperature
            return blip2_retrieval.complete_params(config, params)
        return params

    # -- sizing from config.model

    def scratch(self, m: Blip2Settings, tokenizer) -> Blip2Config:
        vision = EvaConfig(**m.vision)
        qformer = QFormerConfig(
            encoder_hidden_size=vision.hidden_size, vocab_size=len(tokenizer), **m.qformer
        )
        if m.llm_type not in LLMS:
            raise ValueError(f"llm_type must be one of {sorted(LLMS)}, got {m.llm_type!r}")
        llm = LLMS[m.llm_type][0](**llm_sizes(m, tokenizer))
        return Blip2Config(
            vision,
            qformer,
            llm,
            num_query_tokens=m.num_query_tokens,
            image_token_id=base.token_id(tokenizer, base.IMAGE_TOKEN),
            llm_type=m.llm_type,
            itc_embed_dim=m.itc_embed_dim,
            dec_token_id=tokenizer.bos_token_id,  # ITG's [DEC]: the Q-Former shares the tokenizer here
            **video_settings(m),
        )

    def processor(self, config: Blip2Config, tokenizer, image_processor, qformer_tokenizer=None):
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

    def model_spec(self, config: Blip2Config, tokenizer) -> ModelSpec:
        return ModelSpec(
            config.image_token_id,
            config.tokens_per_image,
            layout="prefix",
            frames_per_image=config.frames_per_media,
        )

    def flops_per_sequence(self, c: Blip2Config, seq_len: int, images: int = 1) -> float:
        """The decoder, the EVA tower, and the Q-Former's queries (self-attention, feed-forward and
        cross-attention to the image every ``cross_attention_frequency`` layers)."""
        q = c.qformer
        n_cross = sum(q.has_cross_attention(i) for i in range(q.num_layers))
        per_query = q.num_layers * (4 * q.hidden_size**2 + 2 * q.hidden_size * q.intermediate_size)
        per_query += n_cross * 2 * q.hidden_size**2  # cross-attention q and o
        kv = n_cross * 2 * q.encoder_hidden_size * q.hidden_size * c.vision.num_positions
        projection = q.hidden_size * c.llm.hidden_size * c.num_query_tokens
        qformer = 6.0 * (per_query * c.num_query_tokens + kv + projection) * images
        return flops.decoder_flops(c.llm, seq_len) + flops.vision_flops(c.vision, images) + qformer

    # -- inference

    def prepare_inputs(self, config: Blip2Config, assets: str, prompt: str, images) -> base.Inputs:
        """Blip2Processor / InstructBlipProcessor: one image; its query tokens go in front of the prompt
        (the prompt needs no placeholder); InstructBLIP's Q-Former also reads the prompt."""
        if len(images) != 1:
            raise UsageError(f"BLIP-2 takes exactly one --image, got {len(images)}")
        processor = base.load_processor(assets)
        prompt = prompt.replace(base.IMAGE_TOKEN, "").strip() if base.IMAGE_TOKEN in prompt else prompt
        inputs = processor(images=images, text=prompt, return_tensors="np")
        extra = {}
        if "qformer_input_ids" in inputs:
            extra = {
                "qformer_tokens_BxT": np.asarray(inputs["qformer_input_ids"], np.int32),
                "qformer_mask_BxT": np.asarray(inputs["qformer_attention_mask"], np.int32),
            }
        return base.Inputs(
            processor.tokenizer, inputs["input_ids"][0].tolist(), base.to_nhwc(inputs["pixel_values"]), extra
        )

    def chat_prompt(self, config: Blip2Config, turns, eos="</s>") -> str:
        """BLIP-2's prompt, ``Question: QUESTION Answer:`` (earlier turns as ``Question: Q Answer: A.``,
        as LAVIS's chat demo); InstructBLIP's is the plain instruction (the turns' texts, one a line).
        Images need no placeholder: the processor puts the query tokens in front."""
        texts = [(role, " ".join(p for p in parts if p is not None)) for role, parts in turns]
        if config.qformer.text_input:
            return "\n".join(text for _, text in texts if text)
        out = []
        for role, text in texts:
            if role == "system":
                out.append(text)
            elif role == "user":
                out.append(f"Question: {text} Answer:")
            else:
                out.append(f"{text.rstrip('.')}.")
        return " ".join(out)


FAMILY = Blip2Family()
