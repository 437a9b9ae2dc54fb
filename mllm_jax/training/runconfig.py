"""The schema of a run's config: every key and its default, once, as frozen dataclasses.

``from_config_dict`` checks the ml_collections config of a run against it and freezes it before anything
compiles; every problem is a ``ConfigError`` with one line that names the key. ``presets.base()`` (what
config files start from) is the same defaults as a ConfigDict. The pieces live next to what reads them:
``DataConfig`` (data/config.py), ``OptimConfig`` (optim.py: a stage's optimizer keys sit at the stage's
level), ``LoraConfig`` (lora.py), ``SyntheticConfig`` (data/synthetic.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from mllm_jax import families, schema
from mllm_jax.data.config import DataConfig
from mllm_jax.data.synthetic import SyntheticConfig
from mllm_jax.errors import ConfigError
from mllm_jax.families.trainable import ModelSettings
from mllm_jax.models import layers
from mllm_jax.training.lora import LoraConfig
from mllm_jax.training.optim import OptimConfig

DTYPES = ("float32", "bfloat16")
# what a stage minimises: the LM loss on target tokens, BLIP-2's stage-1 Q-Former losses, or DPO on
# preference pairs (training/dpo.py)
LOSSES = ("lm", "qformer", "dpo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Devices per mesh axis; -1: all the devices the other axes leave (docs/training.md, Sharding)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation on the built-in held-out data after each stage (and every ``every`` steps)."""

    every: int = 0  # stage steps between evaluations inside a stage (0: at its end only)
    num_questions: int = 256  # held-out built-in VQA questions (0: off)
    batch_size: int = 128
    max_new_tokens: int = 3
    shots: tuple[int, ...] = ()  # few-shot VQA: e.g. (0, 4, 8) -> eval/vqa_accuracy_{k}shot
    num_retrieval: int = 0  # held-out images for image-text retrieval after a Q-Former stage (0: off)
    num_grounding: int = 0  # held-out grounding + referring questions each (0: off; location tokens)
    num_clips: int = 0  # held-out synthetic clips asked motion questions (0: off; eval/motion_accuracy)
    num_pope: int = 0  # held-out POPE yes / no questions, a third per negative kind (0: off; eval/pope_*)
    stages: tuple[str, ...] = ()  # evaluate after these stages only (empty: after every stage)
    template: str = ""  # the prompt template of the questions ("": the stage's data.template)
    types: tuple[str, ...] = ("count", "color", "shape")  # question types eval/vqa_accuracy averages

    def check(self, where: str):
        for key in ("every", "num_questions", "num_retrieval", "num_grounding", "num_clips", "num_pope"):
            schema.positive(getattr(self, key), where + key, allow_zero=True)
        for key in ("batch_size", "max_new_tokens"):
            schema.positive(getattr(self, key), where + key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One training stage: its steps, batch, trainable param paths (regexes), optimizer and data."""

    name: str = dataclasses.field(default="", metadata={"key": False})  # its key in config.stages
    steps: int = 100
    batch_size: int = 32  # the global batch over all hosts; divides by grad_accum and the hosts
    grad_accum: int = 1
    trainable: tuple[str, ...] = (r"adapter/.*",)
    # learning_rate, schedule, ... are keys of the stage itself
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig, metadata={"flat": True})
    loss: str = "lm"  # a LOSSES entry: "qformer" is BLIP-2 stage 1 (ITC + ITM + ITG)
    beta: float = 0.1  # loss "dpo": how far from the reference (the stage's starting params) it may move
    # loss "lm": tokens per chunk of the LM head + cross-entropy, so the f32 [B, T, V] logits are never
    # whole (training/xent.py); 0: all tokens at once
    loss_chunk: int = 0
    # low-rank adapters on the targets, merged into them at the end of the stage (rank 0: off)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataConfig = dataclasses.field(metadata={"missing": "each stage names its data"})

    def check(self, where: str):
        for key in ("steps", "batch_size", "grad_accum"):
            schema.positive(getattr(self, key), where + key)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"{where}batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        schema.regexes(self.trainable, where + "trainable")
        if not self.trainable:
            raise ConfigError(f"{where}trainable is empty: name the param paths to train (e.g. 'adapter/.*')")
        schema.one_of(self.loss, LOSSES, where + "loss")
        schema.positive(self.loss_chunk, where + "loss_chunk", allow_zero=True)
        if self.loss_chunk and self.loss != "lm":
            raise ConfigError(f"{where}loss_chunk applies to loss 'lm' only, not {self.loss!r}")
        if not self.beta > 0:
            raise ConfigError(f"{where}beta must be > 0, got {self.beta!r}")


def _stages(d: dict, where: str, built: dict) -> tuple[Stage, ...]:
    """``config.stages`` in ``stage_order``; stages the order leaves out are not read."""
    order, stages = built["stage_order"], d.get("stages", {})
    if not order:
        raise ConfigError(f"{where}stage_order is empty")
    if not isinstance(stages, Mapping):
        raise ConfigError(f"{where}stages must be a group of stages, got {stages!r}")
    for name in order:
        if name not in stages:
            raise ConfigError(
                f"{where}stage_order names stage {name!r}, but {where}stages has {sorted(stages)}"
            )
    return tuple(schema.from_dict(Stage, stages[name], f"{where}stages.{name}.", name=name) for name in order)


def _model(d: dict, where: str, built: dict) -> ModelSettings:
    """``config.model`` as the settings of the family it names."""
    if "model" not in d:
        raise ConfigError(f"{where}model is missing")
    m = schema.plain(d["model"])
    family = families.trainable(m.get("family", ModelSettings.family))
    return schema.from_dict(family.settings_cls, m, where + "model.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    seed: int = 0  # param init; stage i's data shuffle uses seed + 1000 * i
    dtype: str = "float32"  # compute dtype (bfloat16 on TPU); params stay in param_dtype
    param_dtype: str = "float32"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding_rules: dict = dataclasses.field(default_factory=dict)  # logical name -> mesh axis overrides
    stage_order: tuple[str, ...] = ("align", "instruct")
    stages: tuple[Stage, ...] = dataclasses.field(metadata={"build": _stages, "entries": Stage})
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    tensorboard: bool = True
    max_bad_steps: int = 20  # stop after this many non-finite (skipped) steps in a row
    # the kernel every step is traced with: "xla" | "cudnn" (NVIDIA, bf16) | "splash" (Pallas, TPU only)
    attention: str = "xla"
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    # the family's model keys: the settings class of model.family (families/<family>.py)
    model: ModelSettings = dataclasses.field(metadata={"build": _model, "missing": ""})
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)  # the built-in data

    def check(self, where: str):
        for key in ("dtype", "param_dtype"):
            schema.one_of(getattr(self, key), DTYPES, where + key)
        _check_clips(self.stages, self.synthetic)
        for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
            schema.positive(getattr(self, key), where + key)
        schema.one_of(self.attention, layers.ATTENTION_CHOICES, where + "attention")


def _check_clips(stages: tuple[Stage, ...], synthetic: SyntheticConfig) -> None:
    """The synthetic ``video`` task puts a clip's frames in the image slots: it needs one per frame."""
    for stage in stages:
        for _, data in stage.data.components():
            if data.source == "synthetic" and data.task == "video" and data.max_images < synthetic.num_frames:
                raise ConfigError(
                    f"config.stages.{stage.name}.data.max_images={data.max_images}: task 'video' needs "
                    f"max_images >= synthetic.num_frames ({synthetic.num_frames})"
                )


def from_config_dict(config) -> RunConfig:
    """Check a ConfigDict (or plain dict) and freeze it."""
    return schema.from_dict(RunConfig, config)
