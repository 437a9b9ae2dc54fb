"""Params trees addressed by path (``"llm/layers_0/self_attn/q_proj/kernel"``): what freezing, learning
rate groups, LoRA and HF conversion select with regexes, and the LoRA merge ``W + scale * A @ B``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax.numpy as jnp
from flax import traverse_util


def flatten(tree) -> dict[str, object]:
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, object]):
    return traverse_util.unflatten_dict(flat, sep="/")


def matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def split_params(params, trainable: Sequence[str]):
    """``(trainable_tree, frozen_tree)``; raises if the patterns select nothing (a typo, most likely)."""
    flat = flatten(params)
    train = {k: v for k, v in flat.items() if matches(k, trainable)}
    if not train:
        examples = ", ".join(sorted(flat)[:3])
        raise ValueError(
            f"trainable patterns {list(trainable)} match no parameter (paths look like {examples})"
        )
    frozen = {k: v for k, v in flat.items() if k not in train}
    return unflatten(train), (unflatten(frozen) if frozen else {})


def merge_params(trainable, frozen):
    return unflatten({**flatten(frozen), **flatten(trainable)}) if frozen else trainable


def merge_kernel(w, a, b, scale: float):
    """``W + scale * A @ B`` (batched over leading layer dims), in f32, returned in ``W``'s dtype."""
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge_lora(params, factors, scale: float):
    """``params`` with every kernel that has LoRA factors (``{path: {"a": A, "b": B}}``, nested like
    ``params``) replaced by its merged value."""
    flat = flatten(params)
    flat_factors = flatten(factors)
    for path in sorted({p.rsplit("/", 1)[0] for p in flat_factors}):
        if path not in flat:
            raise ValueError(f"LoRA factors for {path}, which is not a param")
        flat[path] = merge_kernel(flat[path], flat_factors[f"{path}/a"], flat_factors[f"{path}/b"], scale)
    return unflatten(flat)
