"""Model families: one file per family owns its config, module, HF interop, input preparation, image
layout, FLOPs and losses (``base.Family``, ``trainable.TrainableFamily``); ``FAMILIES`` is the one
registry, keyed by the name checkpoints record.

Adding a family: write ``families/<name>.py`` with a ``TrainableFamily`` subclass (docs/architecture.md,
"How to add a family"), register its ``FAMILY`` below, add its config file and tests.
"""

from __future__ import annotations

from mllm_jax.errors import ConfigError
from mllm_jax.families import blip2, idefics, llama_adapter, llava, llm, opt, vit
from mllm_jax.families.base import DTYPES, Family, Inputs, Pretrained
from mllm_jax.families.trainable import TrainableFamily

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        llava.FAMILY,
        idefics.FAMILY,
        blip2.FAMILY,
        llama_adapter.FAMILY,
        llm.FAMILY,
        opt.FAMILY,
        vit.FAMILY,
    )
}
TRAINABLE: dict[str, TrainableFamily] = {name: f for name, f in FAMILIES.items() if f.trains}
_BY_MODULE = {f.module_cls: f for f in FAMILIES.values()}

__all__ = ["DTYPES", "FAMILIES", "TRAINABLE", "Family", "Inputs", "Pretrained", "TrainableFamily"]


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def trainable(name: str) -> TrainableFamily:
    """The family ``config.model.family`` names (one that ``main`` trains)."""
    if name not in TRAINABLE:
        raise ConfigError(f"config.model.family {name!r}: one of {sorted(TRAINABLE)} trains here")
    return TRAINABLE[name]


def of_module(module) -> Family:
    """The family of a built linen module (generation asks it for the decoder and example inputs)."""
    return _BY_MODULE[type(module)]


def build(name: str, config, **kwargs):
    """The linen module of family ``name`` for ``config`` (``Family.build``'s keywords)."""
    return get(name).build(config, **kwargs)
