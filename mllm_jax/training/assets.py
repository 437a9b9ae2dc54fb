"""The HF assets a run saves beside its checkpoints (``WORKDIR/hf``): tokenizer, the family's processor,
generation config and the HF config.json, so that every checkpoint exports complete and loads in
transformers."""

from __future__ import annotations

import json
import os

from mllm_jax import hf, paths
from mllm_jax.families import TrainableFamily
from mllm_jax.families.trainable import ModelSettings
from mllm_jax.hf import common
from mllm_jax.training.model_init import assets_source


def write_assets(
    assets: str,
    family: TrainableFamily,
    m: ModelSettings,
    config,
    tokenizer,
    hf_bases: dict,
    qformer_tokenizer,
):
    """Into ``assets`` (a folder, or a bucket path: written locally, then uploaded): copied from the
    whole model a run starts from, else made for it."""
    with paths.Staged(assets) as local:
        _write_assets(local, family, m, config, tokenizer, hf_bases, qformer_tokenizer)


def _write_assets(
    assets, family: TrainableFamily, m: ModelSettings, config, tokenizer, hf_bases, qformer_tokenizer
):
    os.makedirs(assets, exist_ok=True)
    source = assets_source(m.init)
    if source:
        hf.copy_assets(source, assets)
        base = common.read_config(source) if os.path.exists(os.path.join(source, "config.json")) else {}
    else:
        base = _make_assets(assets, family, m, config, tokenizer, hf_bases, qformer_tokenizer)
    if family.frames_per_media(config) > 1:
        return  # clips merged into one media item: no HF config to write (convert --to_hf refuses it)
    with open(os.path.join(assets, "config.json"), "w") as f:
        json.dump(family.config_to_hf(config, base), f, indent=2, sort_keys=True)


def _make_assets(
    assets, family: TrainableFamily, m: ModelSettings, config, tokenizer, hf_bases, qformer_tokenizer
) -> dict:
    """Processor and generation config for a model built here; returns the base of its HF config."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = config.vision.image_size
    if m.init.vision:  # the pretrained tower's own preprocessing
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(m.init.vision, trust_remote_code=False)
    else:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(m.image_mean),
            image_std=list(m.image_std),
        )
    # the Q-Former's own tokenizer (BLIP-2 family) travels in the processor
    family.processor(config, tokenizer, image_processor, qformer_tokenizer).save_pretrained(assets)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # the pretrained parts' own HF configs keep the fields we do not model (names, token ids)
    base = {"vision_config": dict(hf_bases.get("vision", {}))}
    if family.nested_text_config:
        base["text_config"] = {**hf_bases.get("llm", {}), **ids}
    else:  # IDEFICS keeps the decoder's fields at the top level
        base.update(ids)
    with open(os.path.join(assets, "generation_config.json"), "w") as f:
        json.dump(ids, f, indent=2)
    return base
