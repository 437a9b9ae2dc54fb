"""InstructBlipForConditionalGeneration <-> ``Blip2`` with an instruction-reading Q-Former.

Same layout as BLIP-2 (see ``mllm_jax.hf.blip2``) except the Q-Former: ``qformer.embeddings.*``
(word + position embeddings and the LayerNorm that BLIP-2 keeps at ``qformer.layernorm``) and the
text feed-forward (``intermediate`` / ``output``) in every layer.
"""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf import blip2
from mllm_jax.hf.common import Rule
from mllm_jax.models.blip2 import Blip2Config

ARCHITECTURE = "InstructBlipForConditionalGeneration"
ALIASES = ()


def config_from_hf(d: dict) -> Blip2Config:
    return blip2.config_from_hf(d, text_input=True)


def config_to_hf(c: Blip2Config, base: dict | None = None) -> dict:
    if not c.instruct:
        raise ConversionError("this model's Q-Former takes no instruction: export it as BLIP-2")
    d = blip2.common_config_to_hf(c, base, "instructblip", "instructblip")
    d["architectures"] = [ARCHITECTURE]
    return d


def rules(c: Blip2Config) -> list[Rule]:
    return blip2.rules(c)
