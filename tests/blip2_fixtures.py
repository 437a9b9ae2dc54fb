"""Tiny BLIP-2 / InstructBLIP / OPT checkpoints with random weights, built locally and saved with
save_pretrained (never downloaded). Widths differ on purpose (vision 40, Q-Former 24, text 32) so a
transposed or misrouted tensor cannot pass for a right one.
"""

from __future__ import annotations

import numpy as np
from hf_fixtures import make_tokenizer, randomize_, seed_all, text_config

IMAGE_TOKEN = "<image>"
NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 16
QFORMER_VOCAB = 40

VISION = dict(
    hidden_size=40,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
)
QFORMER = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=QFORMER_VOCAB,
    max_position_embeddings=16,
)


def build_blip2(
    path: str,
    *,
    text: str = "opt",
    instruct: bool = False,
    cross_attention_frequency: int = 2,
    qformer_text_input: bool = False,
    text_overrides: dict | None = None,
    seed: int = 0,
) -> str:
    """A tiny Blip2ForConditionalGeneration (or InstructBlipForConditionalGeneration) saved at ``path``."""
    from transformers import (
        AutoConfig,
        Blip2Config,
        Blip2ForConditionalGeneration,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    seed_all(seed)
    tokenizer = make_tokenizer()
    t = text_config(tokenizer, **{"model_type": text, **(text_overrides or {})})
    text_cfg = AutoConfig.for_model(t.pop("model_type"), **t)
    qformer = dict(QFORMER, cross_attention_frequency=cross_attention_frequency)
    kwargs = dict(
        vision_config=dict(VISION),
        text_config=text_cfg,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    if instruct:
        config, cls = (
            InstructBlipConfig(qformer_config=qformer, **kwargs),
            InstructBlipForConditionalGeneration,
        )
    else:
        qformer["use_qformer_text_input"] = qformer_text_input
        config, cls = Blip2Config(qformer_config=qformer, **kwargs), Blip2ForConditionalGeneration
    model = randomize_(cls(config).eval(), seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ITC_DIM = 12  # image_text_hidden_size of the retrieval fixture


def build_blip2_retrieval(
    path: str, *, cross_attention_frequency: int = 2, image_token: bool = False, seed: int = 0
) -> str:
    """A tiny Blip2ForImageTextRetrieval (BLIP-2's stage-1 Q-Former with ITC/ITM heads) saved at ``path``.

    ``image_token``: set ``image_token_index`` (HF then expects ``num_query_tokens`` image ids before
    every caption); without it HF's default (None). HF keeps a text_config it never builds: a tiny OPT.
    """
    from transformers import AutoConfig, Blip2Config, Blip2ForImageTextRetrieval

    seed_all(seed)
    tokenizer = make_tokenizer()
    t = text_config(tokenizer, "opt")
    config = Blip2Config(
        vision_config=dict(VISION),
        qformer_config=dict(
            QFORMER, cross_attention_frequency=cross_attention_frequency, use_qformer_text_input=True
        ),
        text_config=AutoConfig.for_model(t.pop("model_type"), **t),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=ITC_DIM,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if image_token else None,
        architectures=["Blip2ForImageTextRetrieval"],
    )
    model = randomize_(Blip2ForImageTextRetrieval(config).eval(), seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_opt(path: str, seed: int = 0, **overrides) -> str:
    """A tiny OPTForCausalLM saved at ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    seed_all(seed)
    tokenizer = make_tokenizer(image_token=False)
    t = text_config(tokenizer, "opt", **overrides)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(t.pop("model_type"), **t))
    randomize_(model.eval(), seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_params(module, *init_args, seed: int = 0, scale: float = 0.2):
    """Random params for ``module`` from ``eval_shape`` + numpy: no XLA compile of the initialisers
    (jitting a Flax init costs seconds on CPU; these tests only need non-trivial values)."""
    import flax.linen as nn
    import jax

    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *init_args)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def tiny_blip2_config(num_layers: int, vocab_size: int, image_token_id: int):
    """A small random-init BLIP-2 (OPT decoder) for module tests: vision and Q-Former 16 wide, text 24."""
    from mllm_jax.models.blip2 import Blip2Config
    from mllm_jax.models.eva import EvaConfig
    from mllm_jax.models.opt import OptConfig
    from mllm_jax.models.qformer import QFormerConfig

    n = num_layers
    return Blip2Config(
        vision=EvaConfig(16, 32, n, num_heads=2, image_size=8, patch_size=4),
        qformer=QFormerConfig(16, 24, n, num_heads=2, encoder_hidden_size=16),
        llm=OptConfig(
            vocab_size, hidden_size=24, intermediate_size=32, num_layers=n, num_heads=2, max_positions=32
        ),
        num_query_tokens=3,
        image_token_id=image_token_id,
    )
