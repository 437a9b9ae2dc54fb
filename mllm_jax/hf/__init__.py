"""Import HF transformers checkpoints as (family, config, params) and export them back.

``ARCHITECTURES`` is the one table of what we read: HF ``model_type`` -> conversion module and our
model family. Each conversion module is declarative (``config_from_hf``, ``config_to_hf``, ``rules``,
``ALIASES``); this file only dispatches and does the file I/O.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import ModuleType

import numpy as np

from mllm_jax.errors import ConversionError
from mllm_jax.hf import blip2, blip2_retrieval, clip, common, idefics, instructblip, llama, llava, opt

# HF model_type (or, where one model_type has several HF classes, architecture) -> (our family,
# conversion module).
ARCHITECTURES: dict[str, tuple[str, ModuleType]] = {
    "clip_vision_model": ("vit", clip),
    "siglip_vision_model": ("vit", clip),
    "llama": ("llm", llama),
    "mistral": ("llm", llama),
    "qwen2": ("llm", llama),
    "opt": ("opt", opt),
    "llava": ("llava", llava),
    "blip-2": ("blip2", blip2),
    "instructblip": ("blip2", instructblip),
    "Blip2ForImageTextRetrieval": ("blip2", blip2_retrieval),  # model_type "blip-2" too
    "idefics": ("idefics", idefics),
}

# family -> HF keys of an lm_head tied to the embeddings: some checkpoints store a copy; we drop it.
TIED_KEYS = {
    "llm": ("lm_head.weight",),
    "opt": ("lm_head.weight",),
    "llava": ("language_model.lm_head.weight",),
    "blip2": ("language_model.lm_head.weight",),
    "idefics": idefics.TIED_KEYS,
}

# Files that are weights or the model config: everything else in a HF dir (tokenizer, processor,
# chat template, generation config) is an asset that travels with the model.
_NOT_ASSETS = ("config.json", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


@dataclasses.dataclass
class Pretrained:
    family: str
    config: object
    params: dict
    hf_config: dict  # the original config.json, kept as the base of a later export


def architecture(hf_config: dict) -> tuple[str, ModuleType]:
    for name in hf_config.get("architectures") or ():
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"model_type {model_type!r} ({hf_config.get('architectures')}) is not supported; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def load_pretrained(model_dir: str) -> Pretrained:
    """Read a HF directory (config.json + safetensors) into our params (numpy, HF dtypes kept)."""
    hf_config = common.read_config(model_dir)
    family, module = architecture(hf_config)
    config = module.config_from_hf(hf_config)
    tensors = common.normalize_keys(common.read_safetensors(model_dir), module.ALIASES)
    if getattr(getattr(config, "llm", config), "tie_embeddings", False):
        for key in TIED_KEYS.get(family, ()):
            tensors.pop(key, None)
    params = common.hf_to_params(tensors, module.rules(config), f"{model_dir} ({hf_config['model_type']})")
    if hasattr(module, "complete_params"):  # params HF does not store (BLIP-2's ITC temperature)
        params = module.complete_params(config, params)
    return Pretrained(family, config, params, hf_config)


def config_to_hf(family: str, config, base: dict | None = None) -> dict:
    base = base or {}
    if getattr(config, "frames_per_media", 1) > 1:
        # IDEFICS with frame embeddings, or a clip pooled into one block: transformers has neither
        raise ConversionError(
            f"{family} with frames_per_clip={config.frames_per_clip} merges each clip into one media item "
            "(frame embeddings, or video_pool='mean'): transformers has no equivalent, so it is not exported"
        )
    if family == "vit":
        ours = clip.config_to_hf(config)
        ours["architectures"] = [clip.TOWERS[ours["model_type"]]["architecture"]]
    elif family == "llm":
        ours = llama.config_to_hf(config, base.get("model_type", "llama"))
        ours["architectures"] = [llama.DECODERS[ours["model_type"]][0]]
    elif family == "opt":
        ours = opt.config_to_hf(config, base)
        ours["architectures"] = [opt.ARCHITECTURE]
    elif family == "blip2":  # InstructBLIP is BLIP-2 whose Q-Former also reads the instruction
        module = instructblip if config.qformer.text_input else blip2
        if blip2_retrieval.ARCHITECTURE in base.get("architectures", ()):  # stage 1, imported from HF
            module = blip2_retrieval
        ours = module.config_to_hf(config, base)
    else:
        ours = ARCHITECTURES[family][1].config_to_hf(config, base)
    if base.get("model_type", ours["model_type"]) != ours["model_type"]:
        base = {}  # the model changed kind: nothing of the old config applies
    return common.merge_config(base, ours)


def save_pretrained(
    out_dir: str, family: str, config, params, hf_config: dict | None = None, assets_dir: str | None = None
):
    """Write a directory that ``transformers`` loads with ``from_pretrained``: safetensors in PyTorch
    layout, config.json, and the tokenizer/processor assets copied from ``assets_dir``."""
    d = config_to_hf(family, config, hf_config)
    module = architecture(d)[1]  # export goes by the architecture / model_type it writes
    np_params = _to_numpy(params)
    tensors = common.params_to_hf(np_params, module.rules(config), f"export to {d['model_type']}")
    os.makedirs(out_dir, exist_ok=True)
    if assets_dir:
        copy_assets(assets_dir, out_dir)
    common.write_safetensors(out_dir, tensors)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)


def copy_assets(src_dir: str, dst_dir: str):
    """Copy tokenizer, processor, chat template and generation config files."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and name not in _NOT_ASSETS and not name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(dst_dir, name))


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(getattr(tree, "value", tree))  # unbox flax Partitioned leaves
