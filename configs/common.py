"""The shared base of every config: run settings, mesh, checkpointing, logging, evaluation.

Family configs (llava.py, ...) add ``model`` and ``stages``. Every key that exists here can be
overridden from the command line (``--config.seed=1``); keys that do not exist are an error.
"""

from __future__ import annotations

import ml_collections


def data(**overrides) -> ml_collections.ConfigDict:
    """One stage's data (see mllm_jax/data/pipeline.py DataConfig)."""
    d = dict(
        source="synthetic",
        task="vqa",
        path="",
        image_root="",
        template="tiny",
        max_length=64,
        max_images=1,
        num_workers=0,
        shuffle=True,
        split="train",
        size=100_000,
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def stage(**overrides) -> ml_collections.ConfigDict:
    """One training stage: its steps, batch, trainable param paths (regexes), optimizer and data."""
    s = dict(
        steps=100,
        batch_size=32,
        grad_accum=1,
        trainable=(r"adapter/.*",),
        learning_rate=1e-3,
        schedule="cosine",
        warmup_steps=0,
        end_lr_ratio=0.0,
        weight_decay=0.0,
        clip_norm=1.0,
        b1=0.9,
        b2=0.999,
        data=data(),
    )
    d = overrides.pop("data", None)
    s.update(overrides)
    if d is not None:
        s["data"] = d
    return ml_collections.ConfigDict(s)


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype (bfloat16 on TPU); params stay in param_dtype
    c.param_dtype = "float32"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = ml_collections.ConfigDict()  # logical name -> mesh axis overrides
    c.stage_order = ("align", "instruct")
    c.stages = ml_collections.ConfigDict()
    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    c.tensorboard = True
    c.eval = ml_collections.ConfigDict(dict(every=0, num_questions=256, batch_size=128, max_new_tokens=3))
    return c
