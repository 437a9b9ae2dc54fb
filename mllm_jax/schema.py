"""Config schemas as frozen dataclasses: a class's fields are the config keys, and their defaults are the
only place those defaults are written. ``from_dict`` checks a (nested) mapping against a class and
builds it; ``to_config_dict`` turns the defaults (or an instance) back into the ``ml_collections``
ConfigDict that config files start from and the command line overrides.

Field metadata says how a field is read:

- ``key=False``: not a config key (set by the caller through ``from_dict``'s ``extra``, e.g. a stage's name);
- ``flat=True``: a nested dataclass whose keys sit at the parent's level (a stage's optimizer settings);
- ``missing="..."``: the hint in the one-line error for a required key that is absent;
- ``build=fn`` with ``entries=Cls``: ``fn(mapping, where, built)`` (``built``: the fields before it)
  builds the value, a tuple of named ``Cls`` (a run's stages, in ``stage_order``), written back as
  ``{name: {...}}``.

A class may define ``check(self, where)`` (one-line ``ConfigError``s for values no run could use; run
after its nested fields were built and checked) and ``RENAMED = {"old": "new"}``: a config that still
uses an old key gets one line naming the new one. A class's own ``ValueError`` (``DataConfig``'s
"data.mix[1].task ...") names the key from the field on, so it is prefixed with the parent's path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Mapping

import ml_collections

from mllm_jax.errors import ConfigError


def plain(config) -> dict:
    """A ConfigDict (or any mapping) as a plain dict."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def from_dict(cls, mapping, where: str = "config.", **extra):
    """``cls`` built from ``mapping``: unknown or renamed keys are errors, absent keys take their
    defaults, lists become tuples, a lone string becomes a 1-tuple where a ``tuple[str, ...]`` is
    expected and an integer a float where a float is, nested dataclasses are built recursively.
    ``extra``: values of the fields that are not config keys."""
    return _from(cls, mapping, where, extra, None)


def _from(cls, mapping, where: str, extra: dict, base):
    """``from_dict``, with absent keys taken from ``base`` (a field's default instance) if given."""
    if not isinstance(mapping, Mapping) and not hasattr(mapping, "to_dict"):
        raise ConfigError(f"{where.rstrip('.')} must be a group of keys, got {mapping!r}")
    d = plain(mapping)
    _check_keys(cls, d, keys(cls), where)
    return _build(cls, d, where, extra, base)


def keys(cls) -> list[str]:
    """The config keys of ``cls``, a flat part's keys in its place."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        if field.metadata.get("flat"):
            out += keys(hints[field.name])
        elif field.metadata.get("key", True):
            out.append(field.name)
    return out


def _build(cls, d: dict, where: str, extra: dict, base):
    hints = typing.get_type_hints(cls)
    kwargs = dict(extra)
    for field in dataclasses.fields(cls):
        name, kind = field.name, hints[field.name]
        default = getattr(base, name) if base is not None else _default(field)
        if field.metadata.get("flat"):
            kwargs[name] = _build(kind, d, where, {}, default)
        elif not field.metadata.get("key", True):
            continue
        elif "build" in field.metadata:
            kwargs[name] = field.metadata["build"](d, where, kwargs)
        elif name in d:
            kwargs[name] = _value(kind, d[name], where + name + ".", default)
        elif default is not dataclasses.MISSING:
            kwargs[name] = default
        else:
            hint = field.metadata.get("missing")
            raise ConfigError(f"{where}{name} is missing" + (f": {hint}" if hint else ""))
    return _construct(cls, kwargs, where)


def _construct(cls, kwargs: dict, where: str):
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # the class's own check, naming the key from its field on
        raise ConfigError(f"{where[: where.rstrip('.').rfind('.') + 1]}{e}") from None
    if hasattr(obj, "check"):
        obj.check(where)
    return obj


def _value(kind, value, where: str, default):
    if dataclasses.is_dataclass(kind):
        return _from(kind, value, where, {}, default if dataclasses.is_dataclass(default) else None)
    value = _tuples(value)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple and args[:1] == (str,) and isinstance(value, str):
        return (value,)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is dict and isinstance(value, Mapping):
        return dict(value)
    return value


def _tuples(value):
    """Lists (JSON, YAML) as tuples, all the way down; dicts stay dicts."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _check_keys(cls, d: dict, known: list[str], where: str):
    # today's wording: "unknown config key stages.align.'stepz'; did you mean stages.align.'steps'?"
    path = where.removeprefix("config.")
    renamed = getattr(cls, "RENAMED", {})
    for key in d:
        if key in renamed:
            raise ConfigError(f"{where}{key} was renamed: use {where}{renamed[key]}")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {path}{close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path}{key!r}{hint}")


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def _default(field: dataclasses.Field):
    """The field's default (a fresh one from its factory), or ``dataclasses.MISSING``."""
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


# ---------------------------------------------------------------- back to a ConfigDict


def to_config_dict(schema) -> ml_collections.ConfigDict:
    """The ConfigDict of a dataclass instance, or of a class's defaults (a required nested dataclass
    contributes its own defaults; other required keys, such as a run's ``model``, are left out)."""
    cls = schema if isinstance(schema, type) else type(schema)
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        if not field.metadata.get("key", True):
            continue
        kind = hints[field.name]
        if isinstance(schema, type):
            if _has_default(field):
                value = _default(field)
            elif dataclasses.is_dataclass(kind):
                value = kind
            elif "entries" in field.metadata:
                value = ()
            else:
                continue
        else:
            value = getattr(schema, field.name)
        if "entries" in field.metadata:
            value = ml_collections.ConfigDict({e.name: to_config_dict(e) for e in value})
        elif dataclasses.is_dataclass(value):
            value = to_config_dict(value)
        elif isinstance(value, Mapping):
            value = ml_collections.ConfigDict(dict(value))
        if field.metadata.get("flat"):
            out.update(value)
        else:
            out[field.name] = value
    return ml_collections.ConfigDict(out)


# ---------------------------------------------------------------- checks shared by the schemas


def positive(value, key: str, allow_zero: bool = False):
    """``key`` (its whole path, ``config.stages.align.steps``) holds a positive (or >= 0) integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ConfigError(
            f"{key} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}"
        )


def number(value, key: str, low: float = 0.0, inclusive: bool = False):
    """``key`` holds a finite number above ``low`` (or at least ``low``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value >= low if inclusive else value > low):
        raise ConfigError(f"{key} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")


def one_of(value, choices, key: str):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {tuple(choices)}, got {value!r}")


def regexes(value, key: str) -> None:
    """``key`` holds a tuple of regexes (full-match patterns on param paths)."""
    if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{key} must be a tuple of regexes, got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{key}: {pattern!r} is not a regex ({e})") from None
