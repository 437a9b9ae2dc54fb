"""What a run reads from disk exists: checked before anything is written or compiled (``main``)."""

from __future__ import annotations

import dataclasses

from mllm_jax import families, paths
from mllm_jax.data.webdataset import list_shards
from mllm_jax.errors import ConfigError
from mllm_jax.families import store
from mllm_jax.families.trainable import ModelSettings
from mllm_jax.hf.common import TOKENIZER_FILES, has_any_file
from mllm_jax.training import checkpoint
from mllm_jax.training.runconfig import RunConfig

FILE_SOURCES = ("llava_json", "mmc4")  # data.path is one file; webdataset's is a shard dir or pattern


def check_inputs(run: RunConfig, workdir: str) -> None:
    """Every file and directory the run will read exists, checked before anything is written or
    compiled, so a typo in a path is one line rather than a crash after the first stage trained.

    On resume the model comes from the workdir, so ``model.init.*`` is not needed any more, and the
    data of stages the checkpoint has finished is not read again."""
    check_packing(run)
    done = checkpoint.finished_stages(workdir, [(s.name, s.steps) for s in run.stages])
    if done is None:
        _check_model_dirs(run.model)
    for stage in run.stages[len(done or ()) :]:
        for i, (_, data) in enumerate(stage.data.components()):
            where = f"config.stages.{stage.name}.data." + (f"mix[{i}]." if stage.data.mix else "")
            _check_data(data, where)


def check_packing(run: RunConfig) -> None:
    """``data.packing`` only where rows of several examples train as those examples would: an LM loss
    (token sums), in a family whose model keeps examples apart (``cannot_pack`` says why not)."""
    family = families.trainable(run.model.family)
    for stage in run.stages:
        key = f"config.stages.{stage.name}.data.packing=True"
        if not stage.data.packing:
            continue
        if stage.loss != "lm":
            raise ConfigError(
                f"{key}: loss {stage.loss!r} scores whole examples (BLIP-2 stage 1's ITC/ITM contrast "
                "them across the batch, DPO pairs them); packing is for loss 'lm'"
            )
        if why := family.pack_refusal(run.model):
            raise ConfigError(f"{key}: model.family {family.name!r} cannot pack: {why}")


def _check_model_dirs(model: ModelSettings) -> None:
    init = dataclasses.asdict(model.init)
    for key, path in init.items():
        if path and not paths.isdir(paths.check(path, f"config.model.init.{key}")):
            raise ConfigError(f"config.model.init.{key}={path!r}: no such directory")
    if init["checkpoint"] and not store.is_checkpoint(init["checkpoint"]):
        raise ConfigError(
            f"config.model.init.checkpoint={init['checkpoint']!r} is not one of our checkpoints or "
            "workdirs (no mllm_config.json); a HF directory goes in config.model.init.hf"
        )
    for key, path in model.tokenizers().items():  # "builtin": the synthetic word-level vocabulary
        if path in ("", "builtin"):
            continue
        if not paths.isdir(paths.check(path, f"config.model.{key}")):
            raise ConfigError(f"config.model.{key}={path!r}: no such directory (nothing is downloaded)")
        if not has_any_file(path, TOKENIZER_FILES):
            raise ConfigError(
                f"config.model.{key}={path!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...)"
            )


def _check_data(data, where: str) -> None:

    if data.source in FILE_SOURCES and not paths.isfile(paths.check(data.path, where + "path")):
        raise ConfigError(f"{where}path={data.path!r}: no such file")
    if data.source == "webdataset" and not list_shards(data.path):
        raise ConfigError(f"{where}path={data.path!r}: no .tar shards there")
    if (
        data.source in FILE_SOURCES
        and data.image_root
        and not paths.isdir(paths.check(data.image_root, where + "image_root"))
    ):
        raise ConfigError(f"{where}image_root={data.image_root!r}: no such directory")
