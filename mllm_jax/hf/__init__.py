"""HF transformers checkpoints: one declarative conversion module per architecture (``config_from_hf``,
``config_to_hf``, ``rules``, ``ALIASES``), and the directory I/O they share. Which family reads which
architecture is the families' business (``mllm_jax.families.store``).
"""

from __future__ import annotations

import json
import os
import shutil
from types import ModuleType

import numpy as np

from mllm_jax.hf import common

# Files that are weights or the model config: everything else in a HF dir (tokenizer, processor,
# chat template, generation config) is an asset that travels with the model.
_NOT_ASSETS = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def read_params(model_dir: str, module: ModuleType, config, drop_keys=()) -> dict:
    """The params (numpy, HF dtypes kept) of the safetensors in ``model_dir``, through ``module``'s
    rules; ``drop_keys``: stored copies of tied weights."""
    tensors = common.normalize_keys(common.read_safetensors(model_dir), module.ALIASES)
    for key in drop_keys:
        tensors.pop(key, None)
    skip = getattr(module, "SKIP", ())  # parts the model is read without (CLIPModel's text half)
    tensors = {k: v for k, v in tensors.items() if not (skip and k.startswith(skip))}
    what = f"{model_dir} ({common.read_config(model_dir)['model_type']})"
    return common.hf_to_params(tensors, module.rules(config), what)


def write(out_dir: str, module: ModuleType, config, params, hf_config: dict, assets_dir: str | None = None):
    """A directory ``transformers`` loads with ``from_pretrained``: safetensors in PyTorch layout,
    ``hf_config`` as config.json, and the tokenizer/processor assets copied from ``assets_dir``."""
    tensors = common.params_to_hf(
        _to_numpy(params), module.rules(config), f"export to {hf_config['model_type']}"
    )
    os.makedirs(out_dir, exist_ok=True)
    if assets_dir:
        copy_assets(assets_dir, out_dir)
    common.write_safetensors(out_dir, tensors)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


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
