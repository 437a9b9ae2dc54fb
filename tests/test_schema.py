"""mllm_jax.schema: frozen dataclasses as config schemas, read from mappings with one-line errors that
name the key, and written back as the ConfigDicts config files start from."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from mllm_jax import schema
from mllm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    names: tuple[str, ...] = ("a",)

    def check(self, where: str):
        schema.number(self.rate, where + "rate")


@dataclasses.dataclass(frozen=True)
class Strict:
    size: int = 1

    def __post_init__(self):  # a class's own error names the key from its field on, as DataConfig does
        if self.size > 9:
            raise ValueError(f"strict.size is too big: {self.size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    RENAMED = {"lr": "inner.rate"}

    label: str = dataclasses.field(default="", metadata={"key": False})
    steps: int = 10
    inner: Inner = dataclasses.field(default_factory=Inner)
    flat: Inner = dataclasses.field(default_factory=lambda: Inner(rate=0.25), metadata={"flat": True})
    strict: Strict = dataclasses.field(default_factory=Strict)
    required: dict = dataclasses.field(metadata={"missing": "say what it is"})
    extra: dict = dataclasses.field(default_factory=dict)


def test_keys_defaults_and_conversions():
    assert schema.keys(Outer) == ["steps", "inner", "rate", "names", "strict", "required", "extra"]
    o = schema.from_dict(Outer, {"required": {"k": [1, 2]}, "inner": {"rate": 2, "names": "b"}}, label="x")
    assert o.label == "x" and o.steps == 10 and o.required == {"k": (1, 2)}  # lists become tuples
    assert o.inner == Inner(rate=2.0, names=("b",)) and isinstance(o.inner.rate, float)  # int -> float
    assert o.flat == Inner(rate=0.25)  # the flat part's keys sit at the outer level, its defaults kept
    assert schema.from_dict(Outer, {"required": {}, "rate": 3}).flat.rate == 3.0
    config = ml_collections.ConfigDict({"required": {}, "names": ["x", "y"]})
    assert schema.from_dict(Outer, config).flat.names == ("x", "y")


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"required": {}, "stepz": 1}, "unknown config key 'stepz'; did you mean 'steps'?"),
        (
            {"required": {}, "inner": {"rat": 1.0}},
            "unknown config key inner.'rat'; did you mean inner.'rate'?",
        ),
        ({"required": {}, "label": "x"}, "unknown config key 'label'"),  # not a config key
        ({"required": {}, "lr": 0.1}, "config.lr was renamed: use config.inner.rate"),
        ({}, "config.required is missing: say what it is"),
        ({"required": {}, "inner": {"rate": 0}}, "config.inner.rate must be > 0, got 0.0"),
        ({"required": {}, "rate": -1.0}, "config.rate must be > 0, got -1.0"),  # a flat part's check
        ({"required": {}, "strict": {"size": 12}}, "config.strict.size is too big: 12"),
        ({"required": {}, "inner": 3}, "config.inner must be a group of keys, got 3"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(mapping, message):
    with pytest.raises(ConfigError) as e:
        schema.from_dict(Outer, mapping)
    assert str(e.value) == message


def test_defaults_and_instances_back_to_config_dicts():
    defaults = schema.to_config_dict(Outer).to_dict()
    assert defaults == {
        "steps": 10,
        "inner": {"rate": 0.5, "names": ("a",)},
        "rate": 0.25,
        "names": ("a",),
        "strict": {"size": 1},
        "extra": {},
    }  # a required key without a schema of its own is left out; the flat part's keys are inlined
    o = schema.from_dict(Outer, {"required": {"a": 1}, "steps": 3, "rate": 0.75})
    back = schema.to_config_dict(o)
    assert isinstance(back, ml_collections.ConfigDict) and back.required.a == 1
    assert schema.from_dict(Outer, back) == o


def test_shared_checks():
    schema.positive(0, "config.k", allow_zero=True)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="config.k must be a positive integer"):
            schema.positive(bad, "config.k")
    with pytest.raises(ConfigError, match=r"config.p: '\(' is not a regex"):
        schema.regexes(("a", "("), "config.p")
    with pytest.raises(ConfigError, match="config.p must be a tuple of regexes, got 'a'"):
        schema.regexes("a", "config.p")
    with pytest.raises(ConfigError, match=r"config.c must be one of \('x', 'y'\), got 'z'"):
        schema.one_of("z", ("x", "y"), "config.c")
