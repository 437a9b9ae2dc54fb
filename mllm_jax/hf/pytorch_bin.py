"""PyTorch ``.bin`` checkpoints (``pytorch_model.bin``, ``pytorch_model-0000x-of-0000y.bin`` + its index,
the LLaVA repo's ``mm_projector.bin``), read only when a user asks for it once:

    python -m mllm_jax.convert --from_hf=DIR --to_safetensors=OUT

Every other reader takes safetensors only. The files go through PyTorch's restricted loader
(``torch.load(weights_only=True)``: tensors and plain containers, never an arbitrary unpickle); torch
is imported here, inside the functions, because it is not a dependency of the library.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np

from mllm_jax.errors import ConversionError
from mllm_jax.hf import common

INDEX = "pytorch_model.bin.index.json"


def bin_files(model_dir: str) -> list[str]:
    """The ``pytorch_model*.bin`` files of a HF directory (by its index when sharded), in order."""
    index = os.path.join(model_dir, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return sorted(n for n in os.listdir(model_dir) if n.startswith("pytorch_model") and n.endswith(".bin"))


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "reading .bin weights needs PyTorch, which mllm_jax does not install: pip install torch"
        ) from None
    return torch


def load(path: str) -> dict[str, np.ndarray]:
    """The tensors of one ``.bin`` file as numpy (dtypes kept, bf16 through ml_dtypes)."""
    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the restricted unpickler refuses with several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path}: not a plain tensor file (PyTorch's weights_only loader: {first})"
        ) from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        else:
            out[name] = t.numpy().copy()
    return out


def to_safetensors(src: str, out: str) -> list[str]:
    """Convert a ``.bin``-only HF directory once: each ``.bin`` shard becomes one safetensors shard (one
    shard in memory at a time), with ``model.safetensors.index.json`` when sharded, and config.json (the
    tokenizer / processor files: ``hf.copy_assets``, which ``store.bin_to_safetensors`` calls). Returns
    the weight files written."""
    files = bin_files(src)
    if not files:
        raise ConversionError(f"--from_hf={src}: no pytorch_model*.bin files to convert")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ConversionError("--to_safetensors must be a new directory, not --from_hf itself")
    os.makedirs(out, exist_ok=True)
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    weight_map, total = {}, 0
    for name, name_out in zip(files, names, strict=True):
        tensors = load(os.path.join(src, name))
        common.write_file(os.path.join(out, name_out), tensors)
        weight_map.update({k: name_out for k in tensors})
        total += sum(t.nbytes for t in tensors.values())
    if len(files) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    shutil.copy2(os.path.join(src, "config.json"), os.path.join(out, "config.json"))
    return names


def read_weights(model_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a directory: its safetensors if it has them, else its ``.bin`` files (the
    explicit-opt-in commands only), plus the LLaVA repo's ``mm_projector.bin`` beside them."""
    has_safetensors = any(
        os.path.exists(os.path.join(model_dir, n))
        for n in ("model.safetensors", "model.safetensors.index.json")
    )
    files = bin_files(model_dir)
    if has_safetensors:
        tensors = common.read_safetensors(model_dir)
    else:
        tensors = {}
        for name in files:
            tensors.update(load(os.path.join(model_dir, name)))
    projector = os.path.join(model_dir, "mm_projector.bin")
    if os.path.exists(projector):
        tensors.update(load(projector))
    return tensors
