"""LLaMA-Adapter configs (docs/llama_adapter.md): ``configs/llama_adapter.py:tiny`` (CPU demo: one
stage, images and instructions learned together, from scratch on the built-in synthetic data) and
``configs/llama_adapter.py:7b`` (LLaMA-7B + CLIP ViT-L/14 from local HF directories; only the adapter
trains: prompts, gates and the image feature's projection).

    python -m mllm_jax.main --config=configs/llama_adapter.py:tiny --workdir=/tmp/llama_adapter_tiny
"""

from __future__ import annotations

import ml_collections

from mllm_jax.training import presets
from mllm_jax.training.presets import data, stage


def tiny() -> ml_collections.ConfigDict:
    c = presets.base()  # synthetic: the built-in data's defaults (32x32 images, 1-3 shapes)
    c.model = presets.model(
        "llama_adapter",
        vision=ml_collections.ConfigDict(
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                image_size=32,
                patch_size=8,
                act="quick_gelu",
                layer_norm_eps=1e-5,
            )
        ),
        llm=ml_collections.ConfigDict(
            dict(
                hidden_size=128,
                intermediate_size=256,
                num_layers=2,
                num_heads=4,
                num_kv_heads=2,
                head_dim=32,
                max_positions=256,
                rope_theta=10000.0,
                tie_embeddings=False,
            )
        ),
        adapter_len=10,
        adapter_layers=2,
        # from nothing the gates start a little open (tanh(0.1)), as configs/flamingo.py:tiny's: the
        # tower's only gradient passes through them (LLaMA-Adapter's 0 is for a pretrained LLaMA: 7b)
        gate_init=0.1,
        # the global feature: the class token, the patch mean (how many objects: count) and the patch max
        # (whether any patch holds a colour-and-shape feature; its gradient reaches that patch alone, where
        # the mean's is spread over every patch): without the max, shape stayed near chance on some seeds
        # (docs/llama_adapter.md)
        pooling="concat_max",
    )
    # One stage from nothing: captions and questions are learned with the images, which reach the
    # decoder only through the prompts (one <image> token marks them: the longest example is 20 tokens,
    # so 20 positions hold every one, at about half the CPU of 32: padding is masked out, so the same model).
    # Measured (docs/llama_adapter.md): eval/vqa_accuracy 0.993 / 0.986 / 1.000 / 0.948 on seeds 0-3 (blank
    # 0.21-0.31, ~260-290 s of CPU); with the class token and mean alone 0.767 / 0.896 / 0.885 / 0.938.
    c.stage_order = ("instruct",)
    c.stages.instruct = stage(
        steps=3000,
        batch_size=32,
        trainable=(r"vision/.*", r"adapter/.*", r"llm/.*"),
        learning_rate=1e-3,
        warmup_steps=50,
        end_lr_ratio=0.05,
        data=data(max_length=20, mix=(dict(weight=0.3, task="caption"), dict(weight=0.7, task="vqa"))),
    )
    c.log_every = 100
    c.checkpoint_every = 500
    c.eval.every = 0
    c.eval.num_questions = 384
    return c


def _7b() -> ml_collections.ConfigDict:
    c = presets.base()
    c.dtype = "bfloat16"
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.model = presets.model(
        "llama_adapter",
        # LLaMA-7B (vocab 32000; <image> grows the frozen tables to 32064) and CLIP ViT-L/14: the sizes
        # come from the HF directories below; adapter_len / adapter_layers as LLaMA-Adapter's 7B
        adapter_len=10,
        adapter_layers=30,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        tokenizer="",
        remat="full",
    )
    # Set to local HF directories (nothing is downloaded), e.g. of openai/clip-vit-large-patch14 and a
    # LLaMA-7B in HF format: --config.model.init.vision=DIR --config.model.init.llm=DIR.
    c.model.init.vision = ""
    c.model.init.llm = ""
    # LLaMA-Adapter: one stage, adapter only (1.2M params + the projection), lr 9e-3 (the paper's
    # base lr 9e-3 x batch 64 / 256 with batch 64 per 8 GPUs), 5 epochs with warmup.
    c.stage_order = ("instruct",)
    c.stages.instruct = stage(
        steps=20000,
        batch_size=64,
        trainable=(r"adapter/.*",),
        learning_rate=9e-3,
        warmup_steps=500,
        weight_decay=0.02,
        data=data(
            source="llava_json",
            path="llava_instruct_150k.json",
            image_root="images",
            template="vicuna_v1",
            max_length=512,
        ),
    )
    c.log_every = 10
    c.checkpoint_every = 1000
    return c


PRESETS = {"tiny": tiny, "7b": _7b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    return presets.get_config(arg, PRESETS, {}, {}, "configs/llama_adapter.py")
