"""The ml_collections config of a run, checked and turned into frozen dataclasses before anything
compiles. Every problem is a ``ConfigError`` with one line that names the key."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from mllm_jax.data.pipeline import DataConfig
from mllm_jax.errors import ConfigError
from mllm_jax.training.lora import LoraConfig
from mllm_jax.training.optim import SCHEDULES, OptimConfig

DTYPES = ("float32", "bfloat16")
TOP_LEVEL_KEYS = (
    "seed",
    "dtype",
    "param_dtype",
    "mesh",
    "sharding_rules",
    "stage_order",
    "stages",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpoints",
    "tensorboard",
    "eval",
    "model",
    "synthetic",
    "max_bad_steps",
    "attention",
)
STAGE_KEYS = (
    "steps",
    "batch_size",
    "grad_accum",
    "trainable",
    "learning_rate",
    "schedule",
    "warmup_steps",
    "end_lr_ratio",
    "weight_decay",
    "clip_norm",
    "b1",
    "b2",
    "data",
    "loss",
    "no_decay",
    "lora",
)
LORA_KEYS = ("rank", "alpha", "targets")
# what a stage minimises: the LM loss on target tokens, or BLIP-2's stage-1 Q-Former losses
LOSSES = ("lm", "qformer")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    batch_size: int
    grad_accum: int
    trainable: tuple[str, ...]
    optim: OptimConfig
    data: DataConfig
    loss: str = "lm"
    lora: LoraConfig = LoraConfig()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int
    dtype: str
    param_dtype: str
    mesh: dict
    sharding_rules: dict
    stages: tuple[Stage, ...]
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoints: bool
    tensorboard: bool
    eval: dict
    model: dict
    synthetic: dict
    max_bad_steps: int = 20
    attention: str = "xla"  # layers.ATTENTION_CHOICES: the kernel every step is traced with


def _unknown(keys, known, where: str):
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {where}{close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {where}{key!r}{hint}")


def _positive(value, key: str, allow_zero: bool = False):
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ConfigError(
            f"config.{key} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}"
        )


def _stage(name: str, d: dict) -> Stage:
    where = f"stages.{name}."
    _unknown(d, STAGE_KEYS, where)
    for key in ("steps", "batch_size", "grad_accum"):
        _positive(d.get(key, 1), where + key)
    if d["batch_size"] % d.get("grad_accum", 1):
        raise ConfigError(
            f"config.{where}batch_size {d['batch_size']} is not divisible by grad_accum {d['grad_accum']}"
        )
    if d.get("schedule", "cosine") not in SCHEDULES:
        raise ConfigError(f"config.{where}schedule must be one of {SCHEDULES}, got {d['schedule']!r}")
    if not d.get("learning_rate", 0) > 0:
        raise ConfigError(f"config.{where}learning_rate must be > 0, got {d.get('learning_rate')!r}")
    trainable = d.get("trainable", ())
    trainable = (trainable,) if isinstance(trainable, str) else trainable
    if not isinstance(trainable, tuple | list) or not all(isinstance(p, str) for p in trainable):
        raise ConfigError(f"config.{where}trainable must be a tuple of regexes, got {trainable!r}")
    trainable = tuple(trainable)
    if not trainable:
        raise ConfigError(
            f"config.{where}trainable is empty: name the param paths to train (e.g. 'adapter/.*')"
        )
    for pattern in trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.{where}trainable: {pattern!r} is not a regex ({e})") from None
    if d.get("loss", "lm") not in LOSSES:
        raise ConfigError(f"config.{where}loss must be one of {LOSSES}, got {d['loss']!r}")
    optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
    optim = OptimConfig(
        **{k: (tuple(v) if k == "no_decay" else v) for k, v in d.items() if k in optim_fields}
    )
    data = dict(d.get("data", {}))
    data_fields = [f.name for f in dataclasses.fields(DataConfig)]
    _unknown(data, data_fields, where + "data.")
    if "data" not in d:
        raise ConfigError(f"config.{where}data is missing: each stage names its data")
    try:
        data_config = DataConfig(**data)
    except (ValueError, TypeError) as e:  # its messages name the key from "data." on
        raise ConfigError(f"config.{where}{e}") from None
    return Stage(
        name,
        d["steps"],
        d["batch_size"],
        d.get("grad_accum", 1),
        trainable,
        optim,
        data_config,
        d.get("loss", "lm"),
        _lora(where + "lora.", dict(d.get("lora", {}))),
    )


def _lora(where: str, d: dict) -> LoraConfig:
    """``stages.<name>.lora``; whether the targets select kernels is checked against the model
    (``lora.check_stage``)."""
    _unknown(d, LORA_KEYS, where)
    c = LoraConfig(**d)
    _positive(c.rank, where + "rank", allow_zero=True)
    if isinstance(c.alpha, bool) or not isinstance(c.alpha, int | float) or not c.alpha > 0:
        raise ConfigError(f"config.{where}alpha must be > 0, got {c.alpha!r}")
    targets = (c.targets,) if isinstance(c.targets, str) else c.targets
    if not isinstance(targets, tuple | list) or not all(isinstance(p, str) for p in targets):
        raise ConfigError(f"config.{where}targets must be a tuple of regexes, got {targets!r}")
    for pattern in targets:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.{where}targets: {pattern!r} is not a regex ({e})") from None
    if c.rank and not targets:
        raise ConfigError(f"config.{where}targets is empty: name the kernels to adapt")
    return dataclasses.replace(c, targets=tuple(targets), alpha=float(c.alpha))


def _check_clips(stages: tuple[Stage, ...], synthetic: dict) -> None:
    """The synthetic ``video`` task puts a clip's frames in the image slots: it needs one per frame."""
    from mllm_jax.data.synthetic import SyntheticConfig

    frames = synthetic.get("num_frames", SyntheticConfig.num_frames)
    for stage in stages:
        for _, data in stage.data.components():
            if data.source == "synthetic" and data.task == "video" and data.max_images < frames:
                raise ConfigError(
                    f"config.stages.{stage.name}.data.max_images={data.max_images}: task 'video' needs "
                    f"max_images >= synthetic.num_frames ({frames})"
                )


def _attention(choice) -> str:
    from mllm_jax.models.layers import ATTENTION_CHOICES

    if choice not in ATTENTION_CHOICES:
        raise ConfigError(f"config.attention must be one of {tuple(ATTENTION_CHOICES)}, got {choice!r}")
    return choice


def from_config_dict(config) -> RunConfig:
    """Check a ConfigDict (or plain dict) and freeze it."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    _unknown(d, TOP_LEVEL_KEYS, "")
    if "model" not in d:
        raise ConfigError("config.model is missing")
    for key in ("dtype", "param_dtype"):
        if d.get(key, "float32") not in DTYPES:
            raise ConfigError(f"config.{key} must be one of {DTYPES}, got {d.get(key)!r}")
    order = d.get("stage_order", ())
    order = (order,) if isinstance(order, str) else tuple(order)
    if not order:
        raise ConfigError("config.stage_order is empty")
    stages_d = d.get("stages", {})
    for name in order:
        if name not in stages_d:
            raise ConfigError(
                f"config.stage_order names stage {name!r}, but config.stages has {sorted(stages_d)}"
            )
    stages = tuple(_stage(name, stages_d[name]) for name in order)
    _check_clips(stages, dict(d.get("synthetic", {})))
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
        _positive(d.get(key, 1), key)
    mesh = dict(d.get("mesh", {}))
    _unknown(mesh, ("data", "fsdp", "tensor"), "mesh.")
    ev = dict(d.get("eval", {}))
    _positive(ev.get("every", 0), "eval.every", allow_zero=True)
    _positive(ev.get("num_grounding", 0), "eval.num_grounding", allow_zero=True)
    return RunConfig(
        seed=int(d.get("seed", 0)),
        dtype=d.get("dtype", "float32"),
        param_dtype=d.get("param_dtype", "float32"),
        mesh=mesh,
        sharding_rules=dict(d.get("sharding_rules", {})),
        stages=stages,
        log_every=d.get("log_every", 50),
        checkpoint_every=d.get("checkpoint_every", 500),
        keep_checkpoints=d.get("keep_checkpoints", 2),
        async_checkpoints=bool(d.get("async_checkpoints", True)),
        tensorboard=bool(d.get("tensorboard", True)),
        eval=ev,
        model=dict(d["model"]),
        synthetic=dict(d.get("synthetic", {})),
        max_bad_steps=d.get("max_bad_steps", 20),
        attention=_attention(d.get("attention", "xla")),
    )


# ---------------------------------------------------------------- what the run reads from disk

FILE_SOURCES = ("llava_json", "mmc4")  # data.path is one file; webdataset's is a shard dir or pattern
MODEL_DIRS = ("hf", "vision", "llm", "checkpoint")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_inputs(run: RunConfig, workdir: str) -> None:
    """Every file and directory the run will read exists, checked before anything is written or
    compiled, so a typo in a path is one line rather than a crash after the first stage trained.

    On resume the model comes from the workdir, so ``model.init.*`` is not needed any more, and the
    data of stages the checkpoint has finished is not read again."""
    from mllm_jax.training import checkpoint  # checkpoint imports this module

    done = checkpoint.finished_stages(workdir, [(s.name, s.steps) for s in run.stages])
    if done is None:
        _check_model_dirs(run.model)
    for stage in run.stages[len(done or ()) :]:
        for i, (_, data) in enumerate(stage.data.components()):
            where = f"config.stages.{stage.name}.data." + (f"mix[{i}]." if stage.data.mix else "")
            _check_data(data, where)


def _check_model_dirs(model: dict) -> None:
    init = model.get("init", {})
    for key in MODEL_DIRS:
        path = init.get(key, "")
        if path and not os.path.isdir(path):
            raise ConfigError(f"config.model.init.{key}={path!r}: no such directory")
    if init.get("checkpoint") and not os.path.isfile(os.path.join(init["checkpoint"], "mllm_config.json")):
        raise ConfigError(
            f"config.model.init.checkpoint={init['checkpoint']!r} is not one of our checkpoints or "
            "workdirs (no mllm_config.json); a HF directory goes in config.model.init.hf"
        )
    for key in ("tokenizer", "qformer_tokenizer"):  # "builtin": the synthetic word-level vocabulary
        path = model.get(key) or ""
        if path in ("", "builtin"):
            continue
        if not os.path.isdir(path):
            raise ConfigError(f"config.model.{key}={path!r}: no such directory (nothing is downloaded)")
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise ConfigError(
                f"config.model.{key}={path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...)"
            )


def _check_data(data, where: str) -> None:
    from mllm_jax.data.sources import list_shards

    if data.source in FILE_SOURCES and not os.path.isfile(data.path):
        raise ConfigError(f"{where}path={data.path!r}: no such file")
    if data.source == "webdataset" and not list_shards(data.path):
        raise ConfigError(f"{where}path={data.path!r}: no .tar shards there")
    if data.source in FILE_SOURCES and data.image_root and not os.path.isdir(data.image_root):
        raise ConfigError(f"{where}image_root={data.image_root!r}: no such directory")
