"""LLaVA configs: ``configs/llava.py:tiny`` (CPU demo, built-in synthetic data, from scratch),
``configs/llava.py:7b`` and ``:13b`` (LLaVA-1.5 recipe: CLIP ViT-L/14-336 + Vicuna, mlp2x_gelu; 7b
runs on a v5e-8, 2 sequences per chip in 8 micro-batches of the global 128 (stage 1: 16 micro-batches
of the global 256); 13b on a v4-32, 1 per chip;
``python -m mllm_jax.plan`` and docs/scaling.md show how they fit).
Modifiers compose with a preset (mllm_jax/training/presets.py): ``:tiny,lora`` (LoRA in stage 2),
``:tiny,video`` (4-frame clips), ``:tiny,grounding`` (boxes as location tokens), ``:tiny,dpo`` (alias
``tiny_dpo``: align, instruct, then a DPO preference stage, POPE after instruct and DPO); ``tiny_retrieval``
(FROMAGe's [RET] retrieval head, docs/retrieval.md); ``task=video``
and ``task=grounding`` are the same as the video and grounding modifiers.

    python -m mllm_jax.main --config=configs/llava.py:tiny --workdir=/tmp/llava_tiny
"""

from __future__ import annotations

import ml_collections

from mllm_jax.training import presets
from mllm_jax.training.presets import data, stage

VICUNA_SYSTEM_TEMPLATE = "vicuna_v1"


def model(**overrides) -> ml_collections.ConfigDict:
    """Tiny sizes; every other key takes the family's default (mllm_jax/families/llava.py LlavaSettings)."""
    sizes = dict(
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
        vision_feature_layers=(-1,),
    )
    return presets.model("llava", **(sizes | overrides))


def tiny() -> ml_collections.ConfigDict:
    c = presets.base()  # synthetic: the built-in data's defaults (32x32 images, 1-3 shapes)
    c.model = model()
    everything = (r"vision/.*", r"adapter/.*", r"llm/.*")  # nothing is pretrained in tiny
    # Measured on 2 cores: captions are learned (loss ~0) within 300 steps; VQA accuracy keeps rising
    # while the cosine schedule decays. 16 image tokens (8x8 patches of 32x32 images) per image.
    c.stages.align = stage(
        steps=300,
        batch_size=32,
        trainable=everything,
        learning_rate=3e-3,
        warmup_steps=50,
        data=data(task="caption", max_length=36),
    )
    c.stages.instruct = stage(
        steps=2400,
        batch_size=32,
        trainable=everything,
        learning_rate=2e-3,
        warmup_steps=50,
        end_lr_ratio=0.05,
        data=data(task="vqa", max_length=36),
    )
    c.log_every = 100
    c.checkpoint_every = 500
    c.eval.every = 0
    c.eval.num_questions = 384
    return c


def tiny_retrieval() -> ml_collections.ConfigDict:
    """FROMAGe's retrieval output on ``tiny`` (docs/retrieval.md): a ``[RET]`` head (models/retrieval.py)
    and one stage from nothing mixing captions (image -> caption, the LM loss) with retrieval examples (a
    caption naming each shape's cell, then ``[RET]``, whose last hidden state is trained with InfoNCE
    against the image's pooled CLIP class token, both through linear maps into a 64-wide space)."""
    c = presets.base()
    c.synthetic.retrieval_captions = True  # the cells' words and [RET] in the built-in vocabulary
    c.model = model(retrieval=ml_collections.ConfigDict(dict(dim=64, weight=1.0)))
    c.stages.instruct = stage(
        steps=1500,
        batch_size=32,
        trainable=(r"vision/.*", r"adapter/.*", r"llm/.*", r"retrieval/.*"),
        learning_rate=2e-3,
        warmup_steps=50,
        end_lr_ratio=0.05,
        # a retrieval row: caption, [RET], then its image (16 tokens) in a later turn: 46 tokens at most
        data=data(max_length=48, mix=(dict(weight=0.3, task="caption"), dict(weight=0.7, task="retrieval"))),
    )
    # then twice the batch, so that each caption meets more near misses (the same shapes, one moved or
    # two colours swapped) among its in-batch negatives, at a lower learning rate
    c.stage_order = ("instruct", "retrieval")
    c.stages.retrieval = stage(
        steps=400,
        batch_size=64,
        trainable=c.stages.instruct.trainable,
        learning_rate=1e-3,
        warmup_steps=20,
        end_lr_ratio=0.05,
        data=data(max_length=48, mix=(dict(weight=0.2, task="caption"), dict(weight=0.8, task="retrieval"))),
    )
    c.log_every = 100
    c.checkpoint_every = 500
    c.eval.every = 0
    c.eval.num_questions = 0  # evaluate --task=synthetic_retrieval measures it (docs/retrieval.md)
    return c


def lora(c: ml_collections.ConfigDict):
    """LLaVA's LoRA recipe in stage 2 (tuned on ``tiny``): the projector trains fully, the LLM only
    through rank-16 adapters on its attention and MLP projections (merged at the end of the stage), the
    vision tower stays frozen. LoRA's updates start at zero, so it takes a higher learning rate."""
    c.stages.instruct.trainable = (r"adapter/.*",)
    c.stages.instruct.lora.rank = 16
    c.stages.instruct.lora.alpha = 32.0
    c.stages.instruct.learning_rate = 3e-3


def video(c: ml_collections.ConfigDict):
    """Short clips (mllm_jax/data/video.py), tuned on ``tiny``: each clip is ``num_frames`` consecutive
    images (one ``<image>`` block per frame); stage 2 mixes the one-image VQA with motion questions."""
    frames = 4
    c.synthetic.num_frames = frames
    # Measured on 2 cores: direction accuracy jumps from ~0.5 to > 0.9 between ~600 and ~900 instruct
    # steps (1.0 after 1000); a step reads 4 images and 80 tokens, so stage 2 is shorter than tiny's.
    c.stages.instruct.steps = 1000
    # every example of the mix is padded to the clip's shapes: 4 x 16 image tokens + the question
    c.stages.instruct.data = data(
        max_length=80,
        max_images=frames,
        mix=(dict(weight=0.4, task="vqa"), dict(weight=0.6, task="video")),
    )
    c.eval.num_clips = 256
    c.eval.stages = ("instruct",)  # the captions-only align stage cannot answer questions yet


def grounding(c: ml_collections.ConfigDict):
    """Boxes as location tokens (docs/evaluation.md, Grounding): the instruct stage mixes the VQA
    questions with grounding ("where is the red circle ?" -> 4 location tokens) and referring
    ("what is at <loc..>x4 ?" -> "red circle"); both are evaluated on held-out images."""
    c.model.location_tokens = True
    c.stages.instruct.data.mix = (
        dict(weight=0.4, task="vqa"),
        dict(weight=0.3, task="grounding"),
        dict(weight=0.3, task="referring"),
    )
    c.eval.num_grounding = 256


def dpo(c: ml_collections.ConfigDict):
    """Preference tuning against hallucination (docs/dpo.md): the instruct stage also learns yes / no
    object-existence questions (random negatives), then a DPO stage starts from its params (the frozen
    reference) on synthetic pairs whose rejected answers name colours or shapes absent from the image
    (adversarial existence questions, colour / shape questions, hallucinated captions). POPE (random,
    popular, adversarial negatives) is measured after instruct and after DPO."""
    c.synthetic.existence_questions = True
    if c.stages.instruct.data.source == "synthetic":  # 7b,dpo keeps its instruct data
        c.stages.instruct.data.mix = (dict(weight=0.75, task="vqa"), dict(weight=0.25, task="existence"))
    c.stage_order = (*c.stage_order, "dpo")
    c.stages.dpo = stage(
        steps=200,
        batch_size=16,
        trainable=c.stages.instruct.trainable,
        loss="dpo",
        beta=0.1,
        # from instruct's params on tiny (docs/dpo.md): POPE 0.583 after instruct; 1e-5 / 3e-5 / 5e-5 give
        # 0.613 / 0.607 / 0.620 after DPO, 1e-4 0.527 (lower) and VQA 0.767
        learning_rate=3e-5,
        warmup_steps=20,
        data=data(task="preference", max_length=c.stages.instruct.data.max_length),
    )
    c.eval.num_pope = 300
    c.eval.stages = ("instruct", "dpo")


def _real(llm: dict) -> ml_collections.ConfigDict:
    c = presets.base()
    c.dtype = "bfloat16"
    # Memory (docs/scaling.md, the presets on TPU slices): bf16 params and Adam moments halve the state
    # and the gradients; splash attention never builds the [B, N, T, S] scores; the LM head and the loss
    # run 512 tokens at a time (never the whole f32 [B, T, V] logits)
    c.param_dtype = "bfloat16"
    c.attention = "splash"
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.model = model(
        vision=ml_collections.ConfigDict(
            dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_layers=24,
                num_heads=16,
                image_size=336,
                patch_size=14,
                act="quick_gelu",
                layer_norm_eps=1e-5,
            )
        ),
        llm=ml_collections.ConfigDict(llm),
        vision_feature_layers=(-2,),
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        tokenizer="",
        remat="full",
        scan_layers=True,
    )
    # Set to local HF directories (nothing is downloaded), e.g. of openai/clip-vit-large-patch14-336 and
    # lmsys/vicuna-7b-v1.5: --config.model.init.vision=DIR --config.model.init.llm=DIR.
    c.model.init.vision = ""
    c.model.init.llm = ""
    # LLaVA-1.5: stage 1 projector only on 558K pairs, lr 1e-3, batch 256; stage 2 projector + LLM on the
    # 665K mix, lr 2e-5, batch 128; both one epoch with 3% warmup and cosine decay.
    c.stages.align = stage(
        steps=2180,
        batch_size=256,
        # 16 micro-batches of 16: the instruct stage's 2 sequences per chip on a v5e-8 (1 on a v4-32),
        # which fits there with the LLM's gradients and moments that this stage does not have
        grad_accum=16,
        trainable=(r"adapter/.*",),
        learning_rate=1e-3,
        warmup_steps=65,
        data=data(
            source="llava_json",
            path="blip_laion_cc_sbu_558k.json",
            image_root="images",
            template="plain",
            max_length=2048,
        ),
    )
    c.stages.instruct = stage(
        steps=5200,
        batch_size=128,
        grad_accum=8,  # v5e-8: 8 micro-batches of 16, 2 sequences per chip
        trainable=(r"adapter/.*", r"llm/.*"),
        learning_rate=2e-5,
        warmup_steps=156,
        moment_dtype="bfloat16",
        loss_chunk=512,
        data=data(
            source="llava_json",
            path="llava_v1_5_mix665k.json",
            image_root="images",
            template=VICUNA_SYSTEM_TEMPLATE,
            max_length=2048,
        ),
    )
    c.log_every = 10
    c.checkpoint_every = 500
    return c


LLAMA_7B = dict(
    vocab_size=32000,  # LLaMA's; a tokenizer or init.llm dir brings its own
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    max_positions=4096,
    rope_theta=10000.0,
    tie_embeddings=False,
)
LLAMA_13B = dict(
    vocab_size=32000,  # LLaMA's; a tokenizer or init.llm dir brings its own
    hidden_size=5120,
    intermediate_size=13824,
    num_layers=40,
    num_heads=40,
    num_kv_heads=40,
    head_dim=128,
    max_positions=4096,
    rope_theta=10000.0,
    tie_embeddings=False,
)

PRESETS = {
    "tiny": tiny,
    "tiny_retrieval": tiny_retrieval,
    "7b": lambda: _real(LLAMA_7B),
    "13b": lambda: _real(LLAMA_13B),
}
MODIFIERS = {
    "lora": lora,
    "video": video,
    "grounding": grounding,
    "dpo": dpo,
    "task=video": video,
    "task=grounding": grounding,
}
ALIASES = {
    "tiny_lora": "tiny,lora",
    "tiny_video": "tiny,video",
    "tiny_grounding": "tiny,grounding",
    "tiny_dpo": "tiny,dpo",
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    return presets.get_config(arg, PRESETS, MODIFIERS, ALIASES, "configs/llava.py")
