"""BLIP-2 configs: ``configs/blip2.py:tiny`` (CPU demo on built-in synthetic data: stage 1 trains the
Q-Former with ITC + ITM + ITG, stage 2 generates through the LLM), ``:opt-2.7b`` (BLIP-2 OPT-2.7b sizes;
stage 1 on a v5e-16: the paper's global 1680 (ViT-g) as 105 per chip in one micro-batch (210 per chip
on a v5e-8 does not fit); stage 2 on a v5e-8: its 1920 (OPT) as 30 per chip in 8 micro-batches) and
``:vicuna-7b`` (InstructBLIP Vicuna-7b sizes; on a v5e-8: InstructBLIP's global 128 for its 7B models
as 8 per chip in 2 micro-batches); docs/scaling.md has ``python -m mllm_jax.plan``'s figures (every
stage fits the slice named here).

    python -m mllm_jax.main --config=configs/blip2.py:tiny --workdir=/tmp/blip2_tiny
"""

from __future__ import annotations

import ml_collections

from mllm_jax.training import presets
from mllm_jax.training.presets import data, stage


def model(**overrides) -> ml_collections.ConfigDict:
    """Tiny sizes; every other key takes the family's default (mllm_jax/families/blip2.py Blip2Settings)."""
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
                layer_norm_eps=1e-6,
            )
        ),
        qformer=ml_collections.ConfigDict(
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_layers=2,
                num_heads=4,
                cross_attention_frequency=1,
                text_input=False,
                text_ffn=True,  # stage 1 runs text through the Q-Former
                max_positions=64,
            )
        ),
        llm=ml_collections.ConfigDict(
            dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, max_positions=256)
        ),
        num_query_tokens=8,
        itc_embed_dim=32,  # > 0: the stage-1 heads (ITC projections, ITM head, ITG head)
    )
    return presets.model("blip2", **(sizes | overrides))


def tiny() -> ml_collections.ConfigDict:
    c = presets.base()
    c.model = model()
    c.stage_order = ("qformer", "generate")
    # Stage 1: the Q-Former (and, as nothing is pretrained in tiny, the vision tower) against captions
    # with ITC + ITM + ITG; the LLM is not used.
    # 800 steps: ITC and ITG are learned by 400, ITM (docs/blip2.md) still gains on the hard negatives
    c.stages.qformer = stage(
        steps=800,
        batch_size=32,
        trainable=(r"vision/.*", r"adapter/.*"),
        learning_rate=2e-3,
        warmup_steps=50,
        loss="qformer",
        data=data(task="caption", max_length=32, text_length=20),
    )
    # Stage 2: generation through the LLM (trained too: it is not pretrained in tiny), the vision tower
    # frozen as in BLIP-2. Captions in the mix make the LLM read colors and shapes from the queries: on
    # VQA alone it learned the answer priors and counts, but color and shape stayed at chance (0.24,
    # 0.22 after 2000 steps with the tower trainable); with the mix, 1500 steps reach 0.78 and 0.72.
    c.stages.generate = stage(
        steps=1500,
        batch_size=32,
        trainable=(r"adapter/.*", r"llm/.*"),
        learning_rate=2e-3,
        warmup_steps=50,
        end_lr_ratio=0.05,
        data=data(
            task="vqa",
            max_length=32,
            mix=({"weight": 0.3, "task": "caption"}, {"weight": 0.7, "task": "vqa"}),
        ),
    )
    c.log_every = 100
    c.checkpoint_every = 500
    c.eval.num_questions = 384
    c.eval.num_retrieval = 256
    return c


def _real(preset: str) -> ml_collections.ConfigDict:
    c = presets.base()
    c.dtype = "bfloat16"
    c.mesh.fsdp = -1
    c.mesh.data = 1
    llm_type, llm, qformer_text = PRESET_LLMS[preset]
    c.model = model(
        vision=ml_collections.ConfigDict(EVA_VIT_G),
        qformer=ml_collections.ConfigDict(dict(QFORMER_BASE, text_input=qformer_text, text_ffn=True)),
        llm_type=llm_type,
        llm=ml_collections.ConfigDict(llm),
        num_query_tokens=32,
        itc_embed_dim=0 if qformer_text else 256,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        tokenizer="",
        remat="full",
        scan_layers=True,  # the EVA tower and the LLM: one compiled layer body each
    )
    # Local directories (nothing is downloaded): --config.model.init.hf=DIR of Salesforce/blip2-opt-2.7b
    # or Salesforce/instructblip-vicuna-7b in HF format, and --config.model.qformer_tokenizer=DIR of
    # bert-base-uncased for the stage-1 captions. The stage-1 heads start fresh.
    c.model.init.hf = ""
    c.stage_order = ("qformer", "generate")
    # BLIP-2 stage 1: Q-Former + heads against the frozen ViT on image-text pairs (ITC + ITM + ITG),
    # lr 1e-4, weight decay 0.05; stage 2: Q-Former + projection into the frozen LLM with the LM loss.
    # Batches: BLIP-2 (section 3.4) 1680 in stage 1 with ViT-g, 1920 in stage 2 with OPT (docs/scaling.md:
    # stage 1 on a v5e-16, stage 2 on a v5e-8). Stage 1 in one micro-batch: ITC and ITM draw their
    # negatives from the whole batch, as LAVIS gathers them over all its GPUs.
    stage1, stage2, accum2 = PRESET_BATCHES[preset]
    c.stages.qformer = stage(
        steps=250_000,
        batch_size=stage1,
        trainable=(r"adapter/.*",),
        learning_rate=1e-4,
        warmup_steps=5000,
        weight_decay=0.05,
        end_lr_ratio=0.05,
        loss="qformer",
        data=data(
            source="webdataset",
            path="pairs/{00000..09999}.tar",
            template="plain",
            max_length=64,
            text_length=32,
        ),
    )
    c.stages.generate = stage(
        steps=80_000,
        batch_size=stage2,
        grad_accum=accum2,
        trainable=(r"adapter/.*",),
        learning_rate=1e-4,
        warmup_steps=2000,
        weight_decay=0.05,
        end_lr_ratio=0.05,
        data=data(source="webdataset", path="pairs/{00000..09999}.tar", template="plain", max_length=64),
    )
    if qformer_text:
        # InstructBLIP starts from a BLIP-2 stage-1 Q-Former and instruction-tunes (Q-Former + projection);
        # the Q-Former reads the instruction (the prompt before the answer, in the BERT tokenizer of
        # model.qformer_tokenizer; max_txt_len 128 as in LAVIS), as InstructBlipProcessor gives it.
        c.stage_order = ("generate",)
        del c.stages["qformer"]
        c.stages.generate.data = data(
            source="llava_json",
            path="llava_v1_5_mix665k.json",
            image_root="images",
            template="vicuna_v1",
            max_length=512,
            text_length=128,
            text_source="prompt",
        )
    c.log_every = 10
    c.checkpoint_every = 1000
    c.eval.num_questions = 0  # the built-in questions need the built-in tokenizer
    return c


EVA_VIT_G = dict(
    hidden_size=1408,
    intermediate_size=6144,
    num_layers=39,
    num_heads=16,
    image_size=224,
    patch_size=14,
    act="gelu",
    layer_norm_eps=1e-6,
)
QFORMER_BASE = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    cross_attention_frequency=2,
    max_positions=512,
)
OPT_2_7B = dict(hidden_size=2560, intermediate_size=10240, num_layers=32, num_heads=32, max_positions=2048)
VICUNA_7B = dict(
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
# preset -> (llm_type, LLM sizes, InstructBLIP's instruction-aware Q-Former)
PRESET_LLMS = {"opt-2.7b": ("opt", OPT_2_7B, False), "vicuna-7b": ("llm", VICUNA_7B, True)}
# preset -> (stage-1 global batch, stage-2 global batch, stage-2 grad_accum): BLIP-2's 1680 / 1920;
# InstructBLIP's 128 for its 7B models (it has no stage 1 of its own)
PRESET_BATCHES = {"opt-2.7b": (1680, 1920, 8), "vicuna-7b": (1680, 128, 2)}

PRESETS = {"tiny": tiny, "opt-2.7b": lambda: _real("opt-2.7b"), "vicuna-7b": lambda: _real("vicuna-7b")}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """``PRESET[,MODIFIER]...`` (mllm_jax/training/presets.py); this file has no modifiers yet."""
    return presets.get_config(arg, PRESETS, file="configs/blip2.py")
