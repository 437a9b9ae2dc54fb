"""Kept for config files written against it: the shared defaults live in the library now
(``mllm_jax.training.presets``, built from the schema in ``mllm_jax.training.runconfig``), and config
files import that directly."""

from mllm_jax.training.presets import LORA_TARGETS, NO_DECAY, base, data, stage  # noqa: F401
