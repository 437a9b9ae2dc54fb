"""A LLaMA-family decoder on its own (LLaMA, Mistral, Qwen2): what ``config.model.init.llm`` points at,
and a text-only model for ``predict``."""

from __future__ import annotations

from mllm_jax.families.base import Family
from mllm_jax.hf import llama
from mllm_jax.models.llm import Llm, LlmConfig


class LlmFamily(Family):
    name = "llm"
    config_cls = LlmConfig
    module_cls = Llm
    hf_types = {model_type: llama for model_type in llama.DECODERS}
    tied_keys = ("lm_head.weight",)

    def decoder_config(self, config: LlmConfig) -> LlmConfig:
        return config

    def config_to_hf(self, config: LlmConfig, base: dict | None = None) -> dict:
        ours = llama.config_to_hf(config, (base or {}).get("model_type", "llama"))
        ours["architectures"] = [llama.DECODERS[ours["model_type"]][0]]
        return super()._merged(base, ours)


FAMILY = LlmFamily()
