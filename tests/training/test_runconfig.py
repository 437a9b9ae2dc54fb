"""The run's config schema (runconfig.py) and the presets of configs/*.py: every preset gives the config
it gave before the schema (presets_before.json, the ConfigDicts of the old preset functions), modifiers
compose, and mistakes are one line naming the key."""

from __future__ import annotations

import ast
import json
import os

import pytest

from mllm_jax import schema
from mllm_jax.data.synthetic import SyntheticConfig
from mllm_jax.errors import ConfigError
from mllm_jax.families.llava import LlavaSettings
from mllm_jax.training import presets, runconfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")


def load(spec: str):
    return presets.load(os.path.join(CONFIGS, spec))


def _decode(o):
    if isinstance(o, dict):
        return (
            tuple(_decode(x) for x in o["__tuple__"])
            if set(o) == {"__tuple__"}
            else {k: _decode(v) for k, v in o.items()}
        )
    return [_decode(x) for x in o] if isinstance(o, list) else o


with open(os.path.join(os.path.dirname(__file__), "presets_before.json")) as f:
    BEFORE = _decode(json.load(f))  # "llava:tiny" -> get_config("tiny").to_dict() before the schema
# keys the schema added, each holding what the code used when the key was absent
NEW_KEYS = {
    "eval": {"template": "", "types": ("count", "color", "shape"), "num_pope": 0},
    "synthetic": schema.to_config_dict(SyntheticConfig).to_dict(),
    "stage": {"beta": 0.1, "loss_chunk": 0, "moment_dtype": "float32"},
    "data": {"packing": False, "packed_images": 0},  # #15: packed rows
    "llava": {"retrieval": {}},  # #17: the [RET] head, off
}


# what the real presets changed on purpose since (#15: the memory options that make them fit the slices
# their docstrings name; docs/scaling.md, the presets on TPU slices)
_LLAVA_MEMORY = {
    "param_dtype": "bfloat16",
    "attention": "splash",
    "stages": {
        "align": {"grad_accum": 16},
        "instruct": {"grad_accum": 8, "moment_dtype": "bfloat16", "loss_chunk": 512},
    },
}
MEMORY_OPTIONS = {"llava:7b": _LLAVA_MEMORY, "llava:13b": _LLAVA_MEMORY}


def _flamingo_memory(batch: int, grad_accum: int) -> dict:  # IDEFICS's batch of 1024-token sequences
    pretrain = {"batch_size": batch, "grad_accum": grad_accum, "data": {"max_length": 1024}}
    return {
        "attention": "splash",
        "mesh": {"data": 1, "fsdp": -1, "tensor": 4},
        "stages": {
            "pretrain": {**pretrain, "moment_dtype": "bfloat16"},
            "instruct": {"grad_accum": grad_accum * 128 // batch, "moment_dtype": "bfloat16"},
        },
    }


MEMORY_OPTIONS |= {
    "flamingo:9b": _flamingo_memory(1280, 160),
    "flamingo:80b": _flamingo_memory(3584, 112),
    # the papers' batches (BLIP-2: 1680 / 1920; InstructBLIP 7B: 128) and a scanned tower and LLM
    "blip2:opt-2.7b": {
        "model": {"scan_layers": True},
        "stages": {"qformer": {"batch_size": 1680}, "generate": {"batch_size": 1920, "grad_accum": 8}},
    },
    "blip2:vicuna-7b": {
        "model": {"scan_layers": True},
        "stages": {"generate": {"batch_size": 128, "grad_accum": 2}},
    },
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_preset_gives_the_config_it_gave_before(name):
    family, preset = name.split(":")
    before, now = BEFORE[name], load(f"{family}.py:{preset}").to_dict()
    expected = {**before, "eval": {**before["eval"], **NEW_KEYS["eval"]}}
    expected["synthetic"] = {**NEW_KEYS["synthetic"], **before.get("synthetic", {})}
    expected["stages"] = {
        k: {**NEW_KEYS["stage"], **v, "data": {**NEW_KEYS["data"], **v["data"]}}
        for k, v in before["stages"].items()
    }
    if family == "llava":
        expected["model"] = {**NEW_KEYS["llava"], **before["model"]}
    for key, value in MEMORY_OPTIONS.get(name, {}).items():  # changed on purpose since
        if key == "stages":
            for stage_name, keys in value.items():
                was = expected["stages"][stage_name]
                expected["stages"][stage_name] = {
                    **was,
                    **keys,
                    "data": {**was["data"], **keys.get("data", {})},
                }
        elif key == "model":
            expected["model"] = {**expected["model"], **value}
        else:
            expected[key] = value
    assert now == expected
    assert runconfig.from_config_dict(now) == runconfig.from_config_dict(expected)


@pytest.mark.parametrize(
    "old, composed",
    [
        ("tiny_lora", "tiny,lora"),
        ("tiny_video", "tiny,video"),
        ("tiny_video", "tiny,task=video"),
        ("tiny_grounding", "tiny,grounding"),
        ("tiny_grounding", "tiny,task=grounding"),
    ],
)
def test_old_preset_names_are_compositions(old, composed):
    assert load(f"llava.py:{old}").to_dict() == load(f"llava.py:{composed}").to_dict()


def test_modifiers_compose_left_to_right():
    c = load("llava.py:tiny,lora,task=grounding")
    assert c.stages.instruct.lora.rank == 16 and c.model.location_tokens and c.eval.num_grounding == 256
    assert load("llava.py:7b,lora").stages.instruct.lora.rank == 16  # not only on tiny
    assert presets.parse(" tiny , lora,task=video") == ("tiny", ("lora", "task=video"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("llava.py:huge", "unknown preset 'huge' for configs/llava.py; presets: ['13b', '7b', 'tiny', "),
        ("llava.py:tiny,lroa", "unknown modifier 'lroa' for configs/llava.py; modifiers: ['dpo', 'gro"),
        ("llava.py:tiny,task=ocr", "unknown modifier 'task=ocr' for configs/llava.py"),
        ("blip2.py:tiny,lora", "unknown modifier 'lora' for configs/blip2.py; modifiers: []"),
        ("flamingo.py:tiny,", "config argument 'tiny,': expected PRESET[,MODIFIER[=VALUE]]..."),
    ],
)
def test_unknown_presets_and_modifiers_name_the_choices(spec, message):
    with pytest.raises(ConfigError) as e:
        load(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_files_import_only_the_library():
    for name in sorted(os.listdir(CONFIGS)):
        if name.endswith(".py"):
            source = open(os.path.join(CONFIGS, name)).read()
            assert "sys.path" not in source, name
            modules = [
                a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names
            ]
            modules += [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
            assert {m.split(".")[0] for m in modules} <= {"__future__", "ml_collections", "mllm_jax"}, name


def test_builders_are_the_schema_defaults():
    assert presets.stage().to_dict() == schema.to_config_dict(runconfig.Stage).to_dict()
    assert presets.stage(steps=7, data=presets.data(task="caption")).data.task == "caption"
    with pytest.raises(ConfigError, match="Stage has no key 'stepz'"):
        presets.stage(stepz=3)
    run = runconfig.from_config_dict(load("blip2.py:tiny"))
    assert runconfig.from_config_dict(schema.to_config_dict(run)) == run  # a run writes back as it reads


def _tiny(**changes):
    c = load("llava.py:tiny").to_dict()
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = c
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[key]
        else:
            node[key] = value
    return c


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(stages__align__stepz=3),
            "unknown config key stages.align.'stepz'; did you mean stages.align.'steps'?",
        ),
        (dict(stages__align__steps=0), "config.stages.align.steps must be a positive integer, got 0"),
        (
            dict(stages__align__batch_size=30, stages__align__grad_accum=4),
            "config.stages.align.batch_size 30 is not divisible by grad_accum 4",
        ),
        (dict(stages__align__schedule="cos"), "config.stages.align.schedule must be one of ('cosine', "),
        (dict(stages__align__learning_rate=0.0), "config.stages.align.learning_rate must be > 0, got 0.0"),
        (dict(stages__align__trainable=()), "config.stages.align.trainable is empty: name the param paths"),
        (dict(stages__align__trainable=("(",)), "config.stages.align.trainable: '(' is not a regex"),
        (dict(stages__align__loss="ctc"), "config.stages.align.loss must be one of ('lm', 'qformer', 'dpo')"),
        (
            dict(stages__align__data=KeyError),
            "config.stages.align.data is missing: each stage names its data",
        ),
        (dict(stages__align__data__source="laion"), "config.stages.align.data.source must be one of"),
        (dict(stages__align__data__sorce="x"), "unknown config key stages.align.data.'sorce'; did you mean"),
        (dict(stages__instruct__lora__rank=-1), "config.stages.instruct.lora.rank must be a non-negative"),
        (dict(dtype="fp16"), "config.dtype must be one of ('float32', 'bfloat16'), got 'fp16'"),
        (dict(stage_order=()), "config.stage_order is empty"),
        (dict(stage_order=("pretrain",)), "config.stage_order names stage 'pretrain', but config.stages has"),
        (dict(model=KeyError), "config.model is missing"),
        (
            dict(model__family="flamingo"),
            "config.model.family 'flamingo': one of ['blip2', 'idefics', 'llama_adapter', 'llava']",
        ),
        (dict(model__perceiver={}), "unknown config key model.'perceiver'"),  # an IDEFICS key on LLaVA
        (
            dict(model__init__chekpoint="x"),
            "unknown config key model.init.'chekpoint'; did you mean model.init.'checkpoint'?",
        ),
        (dict(model__scan_layers="yes"), "config.model.scan_layers"),
        (dict(mesh__pipeline=2), "unknown config key mesh.'pipeline'"),
        (dict(eval__every=-1), "config.eval.every must be a non-negative integer, got -1"),
        (dict(eval__num_grounding=-1), "config.eval.num_grounding must be a non-negative integer"),
        (dict(synthetic__frames=2), "unknown config key synthetic.'frames'"),
        (dict(attention="flash"), "config.attention must be one of ('xla', 'cudnn', 'splash'), got 'flash'"),
        (dict(log_every=0), "config.log_every must be a positive integer, got 0"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as e:
        runconfig.from_config_dict(_tiny(**changes))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_typed_run():
    run = runconfig.from_config_dict(_tiny(stage_order="instruct", stages__instruct__trainable="adapter/.*"))
    (stage,) = run.stages
    assert stage.name == "instruct" and stage.trainable == ("adapter/.*",)  # a string is a 1-tuple
    assert stage.optim.learning_rate == 2e-3 and stage.optim.eps == 1e-8  # eps is not a config key
    assert run.mesh == runconfig.MeshConfig(data=-1) and run.eval.num_questions == 384
    assert run.synthetic == SyntheticConfig() and isinstance(run.model, LlavaSettings)
    assert run.model.vision_feature_layers == (-1,) and run.model.init.hf == ""  # the preset's, the default
