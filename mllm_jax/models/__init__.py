"""Model families and (de)serialisation of their frozen dataclass configs."""

from __future__ import annotations

import dataclasses
import typing

from mllm_jax.models.blip2 import Blip2, Blip2Config
from mllm_jax.models.idefics import Idefics, IdeficsConfig
from mllm_jax.models.llm import Llm, LlmConfig
from mllm_jax.models.mllm import Llava, LlavaConfig
from mllm_jax.models.opt import Opt, OptConfig
from mllm_jax.models.vit import VisionTower, VitConfig

# family name -> (config class, module class). A checkpoint records its family by this name.
FAMILIES = {
    "llava": (LlavaConfig, Llava),
    "blip2": (Blip2Config, Blip2),  # BLIP-2 and InstructBLIP
    "idefics": (IdeficsConfig, Idefics),  # Flamingo-style
    "llm": (LlmConfig, Llm),
    "opt": (OptConfig, Opt),
    "vit": (VitConfig, VisionTower),
}


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, d: dict):
    """Rebuild a (nested) frozen config; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def build(family: str, config, dtype=None):
    """The linen module of ``family`` for ``config`` (compute in ``dtype``, default f32)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    module = FAMILIES[family][1]
    return module(config) if dtype is None else module(config, dtype)
