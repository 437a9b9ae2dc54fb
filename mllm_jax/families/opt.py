"""An OPT decoder on its own (``OPTForCausalLM``): BLIP-2's usual LLM, and a text-only model for
``predict``."""

from __future__ import annotations

from mllm_jax.families.base import Family
from mllm_jax.hf import opt
from mllm_jax.models.opt import Opt, OptConfig


class OptFamily(Family):
    name = "opt"
    config_cls = OptConfig
    module_cls = Opt
    hf_types = {"opt": opt}
    tied_keys = ("lm_head.weight",)

    def decoder_config(self, config: OptConfig) -> OptConfig:
        return config

    def config_to_hf(self, config: OptConfig, base: dict | None = None) -> dict:
        ours = opt.config_to_hf(config, base)
        ours["architectures"] = [opt.ARCHITECTURE]
        return super()._merged(base, ours)


FAMILY = OptFamily()
