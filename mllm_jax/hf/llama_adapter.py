"""LLaMA-Adapter <-> a HF directory: transformers has no LLaMA-Adapter class, so the directory is the
base decoder as a plain ``LlamaForCausalLM`` (config.json + model.safetensors, which transformers loads
on its own) plus two files beside it:

- ``llama_adapter_config.json``: ``{"vision_config": <CLIPVisionConfig>, "adapter_len", "adapter_layers",
  "image_token_id", "eod_token_id", "gate_init", "pooling"}``;
- ``llama_adapter.safetensors``: the CLIP tower under ``vision_model.*`` (CLIPVisionModel's keys) and
  the adapter: ``adapter.prompts [L, K, D]``, ``adapter.gates [L, N]``, ``adapter.visual_proj.*`` (a
  torch Linear), ``adapter.visual_norm.*`` (a LayerNorm).
"""

from __future__ import annotations

import json
import os

from mllm_jax import hf
from mllm_jax.errors import ConversionError
from mllm_jax.hf import clip, common, llama
from mllm_jax.hf.common import SAME, Rule, dense, ln, prefixed
from mllm_jax.models.llama_adapter import LlamaAdapterConfig

CONFIG_FILE = "llama_adapter_config.json"
WEIGHTS_FILE = "llama_adapter.safetensors"
ALIASES = ()


def is_adapter_dir(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, CONFIG_FILE))


def config_to_hf(c: LlamaAdapterConfig, model_type: str = "llama") -> dict:
    """The base decoder's config.json (``LlamaForCausalLM``)."""
    d = llama.config_to_hf(c.llm, model_type)
    d["architectures"] = [llama.DECODERS[d["model_type"]][0]]
    return d


def adapter_config(c: LlamaAdapterConfig) -> dict:
    return dict(
        vision_config=clip.config_to_hf(c.vision),
        adapter_len=c.adapter_len,
        adapter_layers=c.adapter_layers,
        image_token_id=c.image_token_id,
        eod_token_id=c.eod_token_id,
        gate_init=c.gate_init,  # how training started them (not needed to run the model)
        pooling=c.pooling,
    )


def config_from_hf(hf_config: dict, adapter: dict) -> LlamaAdapterConfig:
    vision = adapter.get("vision_config") or {}
    config = LlamaAdapterConfig(
        vision=clip.config_from_hf({"model_type": "clip_vision_model", **vision}),
        llm=llama.config_from_hf(hf_config),
        adapter_len=adapter["adapter_len"],
        adapter_layers=adapter["adapter_layers"],
        image_token_id=adapter["image_token_id"],
        eod_token_id=adapter.get("eod_token_id"),
        gate_init=adapter.get("gate_init", 0.0),
        pooling=adapter.get("pooling", "class"),
    )
    try:
        config.validate()
    except ValueError as e:
        raise ConversionError(f"{CONFIG_FILE}: {e}") from None
    return config


def adapter_rules(c: LlamaAdapterConfig) -> list[Rule]:
    """The keys of ``llama_adapter.safetensors``."""
    adapter = [Rule("adapter.prompts", "adapter/prompts", SAME), Rule("adapter.gates", "adapter/gates", SAME)]
    adapter += dense("adapter.visual_proj", "adapter/visual_proj") + ln(
        "adapter.visual_norm", "adapter/visual_norm"
    )
    return prefixed(clip.rules(c.vision), "vision_model.", "vision/") + adapter


def read(model_dir: str) -> tuple[LlamaAdapterConfig, dict]:
    """``(config, params)`` of an exported directory (params numpy, dtypes kept)."""
    hf_config = common.read_config(model_dir)
    with open(os.path.join(model_dir, CONFIG_FILE)) as f:
        config = config_from_hf(hf_config, json.load(f))
    drop = ("lm_head.weight",) if config.llm.tie_embeddings else ()
    llm = hf.read_params(model_dir, llama, config.llm, drop)
    path = os.path.join(model_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{model_dir}: {CONFIG_FILE} without its weights {WEIGHTS_FILE}")
    tensors = common.read_file(path)
    params = common.hf_to_params(tensors, adapter_rules(config), f"{path} (LLaMA-Adapter)")
    return config, {**params, "llm": llm}


def write(out_dir: str, config: LlamaAdapterConfig, params, hf_config: dict, assets_dir: str | None = None):
    """The base as a LlamaForCausalLM directory (``hf.write``), the adapter and tower beside it."""
    hf.write(out_dir, llama, config.llm, params["llm"], hf_config, assets_dir)
    rest = hf._to_numpy({"vision": params["vision"], "adapter": params["adapter"]})
    tensors = common.params_to_hf(rest, adapter_rules(config), "export of the LLaMA-Adapter")
    common.write_file(os.path.join(out_dir, WEIGHTS_FILE), tensors)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(config), f, indent=2, sort_keys=True)
