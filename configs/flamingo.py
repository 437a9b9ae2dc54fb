"""Flamingo configs (IDEFICS layout): ``configs/flamingo.py:tiny`` (CPU demo on built-in synthetic data,
from scratch, with multi-image and few-shot evaluation), ``:9b`` (IDEFICS-9B / OpenFlamingo-9B sizes:
CLIP ViT-H/14 + LLaMA-7B, 64 latents, depth 6, a gated block every 4 layers; runs on a v5e-8, mesh fsdp 2
x tensor 4, 4 sequences of 1024 per fsdp rank in 160 micro-batches of IDEFICS-9B's global 1280: 14.8
GiB of 16 per chip in ``python -m mllm_jax.plan``) and ``:80b`` (IDEFICS-80B sizes: LLaMA-65B; runs on a
v5p-64, mesh fsdp 8 x tensor 4, 4 per fsdp rank in 112 micro-batches of IDEFICS-80B's global 3584: 35.5
GiB of 95 per chip in ``python -m mllm_jax.plan``; on a v5p-32 it needs 96.8: docs/scaling.md).

    python -m mllm_jax.main --config=configs/flamingo.py:tiny --workdir=/tmp/flamingo_tiny
"""

from __future__ import annotations

import ml_collections

from mllm_jax.training import presets
from mllm_jax.training.presets import data, stage

# Flamingo freezes the vision tower and the LM: it trains the perceiver and the gated blocks (`adapter`)
# and the new token rows (`llm/additional_*`, IDEFICS's decoupled embeddings).
FLAMINGO_TRAINABLE = (r"adapter/.*", r"llm/additional_.*")
# Gates (tanh(alpha)) take no weight decay: decayed towards 0 they close the path from the images.
NO_DECAY = presets.NO_DECAY + (r".*alpha_.*",)


def model(**overrides) -> ml_collections.ConfigDict:
    """Tiny sizes; every other key takes the family's default (families/idefics.py IdeficsSettings)."""
    sizes = dict(
        vision=ml_collections.ConfigDict(
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                image_size=32,
                patch_size=8,
                act="gelu",
                layer_norm_eps=1e-5,
            )
        ),
        llm=ml_collections.ConfigDict(
            dict(
                hidden_size=128,
                intermediate_size=256,
                num_layers=2,
                num_heads=4,
                num_kv_heads=4,
                head_dim=32,
                max_positions=256,
                rope_theta=10000.0,
                tie_embeddings=False,
            )
        ),
        perceiver=ml_collections.ConfigDict(
            dict(
                num_latents=8,
                depth=1,
                num_heads=4,
                head_dim=16,
                mlp_dim=256,
                act="relu",
                qk_layer_norms=False,
                latents_init_std=1.0,  # IDEFICS: N(0, 1)
                qk_init_std=0.0,  # 0: N(0, 0.02) as every other kernel
            )
        ),
        xattn=ml_collections.ConfigDict(
            dict(
                intermediate_size=256,
                num_heads=4,
                head_dim=32,
                act="silu",
                qk_layer_norms=False,
                alpha_type="float",
                alpha_init="zeros",  # a pretrained LM is unchanged until training opens the gates
                alpha_init_std=0.0,
                alpha_init_value=0.0,
            )
        ),
    )
    return presets.model("idefics", **(sizes | overrides))


def tiny() -> ml_collections.ConfigDict:
    c = presets.base()
    c.model = model()
    # The Perceiver resampler from scratch (docs/flamingo.md): with IDEFICS's init each latent reads the
    # same near-uniform mean of the image and the latents swamp it (the media are the same for every
    # image), so the model stays at the blank-image baseline. Small latents, q/k large enough for
    # attention to pick patches from the first step, and image tokens at twice the latents' scale in the
    # perceiver's keys and values (else the latents, keys too, take most of the attention) fix it; all
    # three are initial values only (HF IDEFICS parity and export are unchanged).
    c.model.perceiver.latents_init_std = 0.02
    c.model.perceiver.qk_init_std = 0.25
    c.model.perceiver.context_norm_init = 2.0
    # From scratch, gates at exactly 0 stay near 0 (the model learns the text-only solution first):
    # start them open a little (measured while planning: 0.1 works, 0 does not).
    c.model.xattn.alpha_init = "constant"
    c.model.xattn.alpha_init_value = 0.1
    everything = (r"vision/.*", r"adapter/.*", r"llm/.*")  # nothing is pretrained in tiny
    # Up to 3 images a sample (documents of 2-3 image+text turns) in 64 tokens; few-shot prompts at
    # evaluation are longer (4-shot: 5 images, ~85 tokens), which the model has to generalise to.
    length, images = 64, 3
    pairs = dict(weight=0.5, task="caption")
    # multi-image documents (image, its caption, image, its caption, ...) and conversations (image, its
    # question and answer, ...): each text is about the latest image, as in few-shot prompts
    captions = dict(weight=0.5, task="interleaved_caption")
    docs = dict(weight=0.5, task="interleaved")
    # 300 align steps (the tower learns here only): at 200, seed 1 stayed at 0.771 and seed 3's 4-shot fell
    # 0.056 below its 0-shot; at 300, seeds 0-3 all clear the bar (docs/flamingo.md)
    c.stages.align = stage(
        steps=300,
        batch_size=32,
        trainable=everything,
        learning_rate=1.5e-3,  # 3e-3 / 2e-3 left shape at chance: docs/flamingo.md
        warmup_steps=50,
        no_decay=NO_DECAY,
        data=data(max_length=length, max_images=images, mix=(pairs, captions)),
    )
    c.stages.instruct = stage(
        steps=600,
        batch_size=32,
        trainable=everything,
        learning_rate=1e-3,
        warmup_steps=50,
        end_lr_ratio=0.05,
        no_decay=NO_DECAY,
        data=data(max_length=length, max_images=images, mix=(dict(weight=0.5, task="vqa"), docs)),
    )
    # Flamingo keeps the vision tower frozen; in tiny it learns in stage 1 only (from scratch), which
    # also spares stage 2 its backward pass.
    c.stages.instruct.trainable = (r"adapter/.*", r"llm/.*")
    c.model.cross_layer_interval = 2  # one gated block per two decoder layers (IDEFICS-9B: 4)
    c.log_every = 100
    c.checkpoint_every = 500
    c.eval.every = 0
    c.eval.num_questions = 384
    c.eval.shots = (0, 4, 8)
    c.eval.stages = ("instruct",)  # after captioning alone the questions mean nothing
    return c


def _real(
    llm: dict, vision: dict, xattn: dict, perceiver: dict, tensor: int, batch: int, grad_accum: int
) -> ml_collections.ConfigDict:
    """``batch``: the pretrain stage's global batch (IDEFICS's model card: 1.31M tokens for 9B, 3.67M for
    80B, in sequences of 1024), in ``grad_accum`` micro-batches; ``tensor``: chips per tensor group."""
    c = presets.base()
    c.dtype = "bfloat16"
    # Memory (docs/scaling.md, the presets on TPU slices). This family's decoder is not scanned (the
    # gated blocks sit between its layers); with FSDP alone the 9b step's temporaries on a v5e-8 were
    # about the whole model in bf16 (15.2 GiB at 2 x 512 tokens per chip), as if every layer's
    # gathered weights stayed alive. Tensor parallelism inside a host divides the weights each chip
    # gathers by `tensor`. f32 params (the gated blocks train at small learning rates), bf16 Adam
    # moments, splash attention (no [B, N, T, S] scores), full remat.
    c.attention = "splash"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = tensor
    c.model = model(
        vision=ml_collections.ConfigDict(vision),
        llm=ml_collections.ConfigDict(llm),
        perceiver=ml_collections.ConfigDict(perceiver),
        xattn=ml_collections.ConfigDict(xattn),
        cross_layer_interval=4,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        tokenizer="",
        remat="full",
    )
    # Local HF directories (nothing is downloaded): --config.model.init.vision=DIR (a CLIP ViT-H/14,
    # e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K in HF format) --config.model.init.llm=DIR (LLaMA-7B),
    # or --config.model.init.hf=DIR of HuggingFaceM4/idefics-9b to continue from IDEFICS.
    # Stage 1 (Flamingo pre-training): perceiver + gated blocks + new tokens on MMC4-style documents
    # mixed with image-text pairs; stage 2: instruction tuning (IDEFICS-instruct style).
    c.stages.pretrain = stage(
        steps=20_000,
        batch_size=batch,
        grad_accum=grad_accum,
        trainable=FLAMINGO_TRAINABLE,
        learning_rate=1e-4,
        warmup_steps=2000,
        weight_decay=0.1,
        no_decay=NO_DECAY,
        moment_dtype="bfloat16",
        data=data(
            max_length=1024,
            max_images=5,
            mix=(
                dict(weight=0.7, source="mmc4", path="mmc4/docs.jsonl", image_root="mmc4/images"),
                dict(weight=0.3, source="webdataset", path="laion/{00000..09999}.tar"),
            ),
            template="plain",
        ),
    )
    # 128 as LLaVA-1.5 on its mix, as many sequences per fsdp rank as pretrain (fewer images)
    c.stages.instruct = stage(
        steps=5000,
        batch_size=128,
        grad_accum=grad_accum * 128 // batch,
        moment_dtype="bfloat16",
        trainable=FLAMINGO_TRAINABLE,
        learning_rate=2e-5,
        warmup_steps=150,
        no_decay=NO_DECAY,
        data=data(
            source="llava_json",
            path="llava_v1_5_mix665k.json",
            image_root="images",
            template="vicuna_v1",
            max_length=1024,
            max_images=1,
        ),
    )
    c.stage_order = ("pretrain", "instruct")
    c.log_every = 10
    c.checkpoint_every = 500
    c.eval.num_questions = 0  # the built-in questions need the built-in tokenizer
    return c


LLAMA_7B = dict(
    vocab_size=32000,  # LLaMA's; a tokenizer or init.llm dir brings its own
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    max_positions=2048,
    rope_theta=10000.0,
    tie_embeddings=False,
)
LLAMA_65B = dict(
    LLAMA_7B, hidden_size=8192, intermediate_size=22016, num_layers=80, num_heads=64, num_kv_heads=64
)
CLIP_VIT_H14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_layers=32,
    num_heads=16,
    image_size=224,
    patch_size=14,
    act="gelu",
    layer_norm_eps=1e-5,
)
PERCEIVER_9B = dict(
    num_latents=64, depth=6, num_heads=16, head_dim=96, mlp_dim=5120, act="relu", qk_layer_norms=False
)
XATTN_9B = dict(
    intermediate_size=11008,
    num_heads=32,
    head_dim=128,
    act="silu",
    qk_layer_norms=False,
    alpha_type="float",
    alpha_init="zeros",
    alpha_init_std=0.0,
    alpha_init_value=0.0,
)
XATTN_80B = dict(XATTN_9B, intermediate_size=22016, num_heads=64, qk_layer_norms=True)

PRESETS = {
    "tiny": tiny,
    # v5e-8 (8 chips): fsdp 2 x tensor 4, 4 per fsdp rank: 1280 = 4 x 2 x 160
    "9b": lambda: _real(LLAMA_7B, CLIP_VIT_H14, XATTN_9B, PERCEIVER_9B, tensor=4, batch=1280, grad_accum=160),
    # v5p-64 (32 chips): fsdp 8 x tensor 4, 4 per fsdp rank: 3584 = 4 x 8 x 112 (a v5p-32 misses by 1.8 GiB)
    "80b": lambda: _real(
        LLAMA_65B,
        CLIP_VIT_H14,
        XATTN_80B,
        dict(PERCEIVER_9B, qk_layer_norms=True),
        tensor=4,
        batch=3584,
        grad_accum=112,
    ),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """``PRESET[,MODIFIER]...`` (mllm_jax/training/presets.py); this file has no modifiers yet."""
    return presets.get_config(arg, PRESETS, file="configs/flamingo.py")
