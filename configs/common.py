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
        mix=(),  # weighted components: ({"weight": 0.5, "task": "caption"}, {"weight": 0.5, ...})
        text_length=0,  # > 0: also text_tokens/text_mask for a Q-Former (BLIP-2)
        text_source="all",  # text_tokens of "all" the text, or the "prompt" only (InstructBLIP)
        max_skipped_fraction=0.05,  # fail when more of the records read are skipped (1.0: never)
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


# params without weight decay by default: biases, norm scales, embedding tables
NO_DECAY = (r".*bias", r".*scale", r".*embedding", r".*class_embedding", r".*probe")


# the LLM's attention and MLP projections (mllm_jax/lora.py DEFAULT_TARGETS)
LORA_TARGETS = (r"llm/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",)


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
        # params without weight decay (regexes on param paths); Flamingo adds its tanh gates
        no_decay=NO_DECAY,
        loss="lm",  # "lm" | "qformer" (BLIP-2 stage 1: ITC + ITM + ITG)
        # low-rank adapters on the targets, merged into them at the end of the stage (rank 0: off)
        lora=ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=LORA_TARGETS)),
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
    c.max_bad_steps = 20  # stop after this many non-finite (skipped) steps in a row
    c.attention = "xla"  # "xla" | "cudnn" (NVIDIA, bf16) | "splash" (Pallas kernel, TPU only)
    c.eval = ml_collections.ConfigDict(
        dict(
            every=0,
            num_questions=256,  # held-out built-in VQA questions (0: off)
            batch_size=128,
            max_new_tokens=3,
            shots=(),  # few-shot VQA: e.g. (0, 4, 8) -> eval/vqa_accuracy_{k}shot
            num_retrieval=0,  # held-out images for image-text retrieval after a Q-Former stage (0: off)
            num_grounding=0,  # held-out grounding + referring questions each (0: off; location tokens)
            num_clips=0,  # held-out synthetic clips asked motion questions (0: off; eval/motion_accuracy)
            stages=(),  # evaluate after these stages only (empty: after every stage)
        )
    )
    return c
