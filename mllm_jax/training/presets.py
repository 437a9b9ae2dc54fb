"""What config files share: the run's defaults as ConfigDicts (``base``, ``stage``, ``data``, ``model``: the
schema's own defaults, runconfig.py and the family's settings) and presets that compose.

``configs/<family>.py:ARG`` names a preset and modifiers applied to it left to right,
``PRESET[,MODIFIER]...``, where a modifier is a name (``lora``) or a name with a value
(``task=grounding``): ``configs/llava.py:tiny,lora``. A config file lists its ``PRESETS`` (name ->
function returning a ConfigDict), ``MODIFIERS`` (``"lora"`` or ``"task=grounding"`` -> function changing
a ConfigDict in place) and ``ALIASES`` (old preset names -> an ARG), and its ``get_config`` is
``presets.get_config(arg, PRESETS, MODIFIERS, ALIASES, "configs/<family>.py")``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping

import ml_collections

from mllm_jax import families, schema
from mllm_jax.data.config import DataConfig
from mllm_jax.errors import ConfigError
from mllm_jax.training.lora import DEFAULT_TARGETS as LORA_TARGETS  # noqa: F401 (for config files)
from mllm_jax.training.optim import NO_DECAY  # noqa: F401 (for config files)
from mllm_jax.training.runconfig import RunConfig, Stage

Preset = Callable[[], ml_collections.ConfigDict]
Modifier = Callable[[ml_collections.ConfigDict], None]


def base() -> ml_collections.ConfigDict:
    """Every run key with its default; family configs add ``model`` and ``stages``."""
    return schema.to_config_dict(RunConfig)


def stage(**overrides) -> ml_collections.ConfigDict:
    """One training stage: the defaults with ``overrides`` (``data`` replaced as a whole)."""
    return _with(Stage, overrides)


def data(**overrides) -> ml_collections.ConfigDict:
    """One stage's data (``DataConfig``)."""
    return _with(DataConfig, overrides)


def model(family: str, **overrides) -> ml_collections.ConfigDict:
    """``config.model`` of ``family``: its settings' defaults (families/<family>.py) with ``overrides``."""
    return _with(families.trainable(family).settings_cls, dict(family=family, **overrides))


def _with(cls, overrides: dict) -> ml_collections.ConfigDict:
    d = schema.to_config_dict(cls).to_dict()
    for key in overrides:
        if key not in d:
            raise ConfigError(f"{cls.__name__} has no key {key!r}; keys: {sorted(d)}")
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def parse(arg: str) -> tuple[str, tuple[str, ...]]:
    """``"tiny,lora,task=grounding"`` -> ``("tiny", ("lora", "task=grounding"))``."""
    name, *modifiers = [part.strip() for part in (arg or "").split(",")]
    for part in (name, *modifiers):
        if not re.fullmatch(r"[\w.\-]+(=[\w.\-]+)?", part):
            raise ConfigError(f"config argument {arg!r}: expected PRESET[,MODIFIER[=VALUE]]...")
    return name, tuple(modifiers)


def get_config(
    arg: str,
    presets: Mapping[str, Preset],
    modifiers: Mapping[str, Modifier] | None = None,
    aliases: Mapping[str, str] | None = None,
    file: str = "the config file",
) -> ml_collections.ConfigDict:
    """The config ``arg`` names (see the module docstring); an unknown name is one line listing the
    choices."""
    modifiers, aliases = modifiers or {}, aliases or {}
    name, extra = parse(arg)
    if name in aliases:
        name, first = parse(aliases[name])
        extra = first + extra
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r} for {file}; presets: {sorted({*presets, *aliases})}")
    config = presets[name]()
    for modifier in extra:
        if modifier not in modifiers:
            raise ConfigError(f"unknown modifier {modifier!r} for {file}; modifiers: {sorted(modifiers)}")
        modifiers[modifier](config)
    return config


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of ``"configs/llava.py:tiny,lora"`` (a path, relative to the working directory, and its
    ARG), as ``--config`` loads it: for tests and notebooks, with no ``sys.path`` to edit."""
    path, _, arg = spec.partition(":")
    name = "config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
