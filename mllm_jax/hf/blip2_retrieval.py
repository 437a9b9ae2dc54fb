"""Blip2ForImageTextRetrieval <-> ``Blip2`` with stage-1 heads (``itc_embed_dim > 0``).

HF's retrieval model is BLIP-2's stage-1 Q-Former: ``vision_model.*``, ``query_tokens``,
``embeddings.{word,position}_embeddings`` (no LayerNorm: ``qformer.layernorm`` normalises queries and
text together), ``qformer.*`` with the text feed-forward, ``vision_projection``, ``text_projection`` and
``itm_head``. It has no language model: the params hold ``vision`` and ``adapter`` only, and the config's
``llm`` is the (never built) ``text_config`` HF keeps. It shares ``model_type`` "blip-2" with
``Blip2ForConditionalGeneration``, so ``mllm_jax.hf`` tells them apart by ``architectures``.

HF stores no ITC temperature: import adds LAVIS's initial ``temp`` (``complete_params``), export drops it.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.errors import ConversionError
from mllm_jax.hf import blip2, eva
from mllm_jax.hf.common import Rule, dense, prefixed
from mllm_jax.models.blip2 import Blip2Config
from mllm_jax.models.qformer import INIT_TEMP

ARCHITECTURE = "Blip2ForImageTextRetrieval"
ALIASES = ()


def config_from_hf(d: dict) -> Blip2Config:
    qformer = d.get("qformer_config") or {}
    if not qformer.get("use_qformer_text_input", False):
        raise ConversionError(
            f"{ARCHITECTURE} needs qformer_config.use_qformer_text_input=true (its text runs through the "
            "Q-Former's text feed-forward)"
        )
    vision = eva.config_from_hf(d.get("vision_config") or {})
    token = d.get("image_token_index")
    config = Blip2Config(
        vision=vision,
        qformer=blip2.qformer_config_from_hf(qformer, vision.hidden_size, text_input=False),
        llm=blip2.text_config_from_hf(d.get("text_config") or {}),
        num_query_tokens=d.get("num_query_tokens", 32),
        image_token_id=Blip2Config.image_token_id if token is None else token,
        itc_embed_dim=d.get("image_text_hidden_size", 256),
    )
    config.validate()
    return config


def config_to_hf(c: Blip2Config, base: dict | None = None) -> dict:
    if not c.itc_embed_dim:
        raise ConversionError(f"this BLIP-2 has no stage-1 heads (itc_embed_dim=0): it is no {ARCHITECTURE}")
    d = blip2.config_to_hf(c, base)
    # With an image_token_index HF expects num_query_tokens <image> ids before every caption: keep
    # whatever the original config said (HF's default: none).
    d["image_token_index"] = (base or {}).get("image_token_index")
    d["image_text_hidden_size"] = c.itc_embed_dim
    d["architectures"] = [ARCHITECTURE]
    return d


def rules(c: Blip2Config) -> list[Rule]:
    return (
        prefixed(eva.rules(c.vision), "vision_model.", "vision/")
        + [
            Rule("query_tokens", "adapter/query_tokens"),
            Rule("embeddings.word_embeddings.weight", "adapter/embeddings/word_embeddings/embedding"),
            Rule("embeddings.position_embeddings.weight", "adapter/embeddings/position_embeddings/embedding"),
        ]
        + prefixed(blip2.qformer_rules(c.qformer), "qformer.", "adapter/qformer/")
        + dense("vision_projection", "adapter/vision_projection")
        + dense("text_projection", "adapter/text_projection")
        + dense("itm_head", "adapter/itm_head")
    )


def complete_params(c: Blip2Config, params: dict) -> dict:
    """Add what HF does not store: the ITC temperature at its initial value."""
    params["adapter"].setdefault("temp", np.asarray(INIT_TEMP, np.float32))
    return params
