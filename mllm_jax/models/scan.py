"""``nn.scan`` over a stack of identical layers, and conversion between the two param layouts.

Unscanned, layer ``i`` lives at ``.../layers_{i}/...``; scanned, all layers live at ``.../layers/...``
with a leading layer axis (logical name ``layers``). Scanning compiles one layer body instead of N,
which is what keeps compile times flat for 32-80 layer models on TPU; the numbers are the same.
HF conversion and our checkpoints' exported form use the unscanned layout; ``stack_layers`` and
``unstack_layers`` move between the two.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import numpy as np

_LAYER = re.compile(r"layers_(\d+)")


def scanned(layer_cls, num_layers: int, in_axes: tuple):
    """``layer_cls`` scanned ``num_layers`` times; the first call argument is the carry, the others
    follow ``in_axes`` (``nn.broadcast`` or 0). The layer must return ``(carry, per_layer_output)``."""
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def stack_layers(tree):
    """Every dict holding ``layers_0..layers_{N-1}`` gets them replaced by one stacked ``layers``."""
    if not isinstance(tree, dict):
        return tree
    out, layers = {}, {}
    for key, value in tree.items():
        m = _LAYER.fullmatch(key)
        if m:
            layers[int(m.group(1))] = value
        else:
            out[key] = stack_layers(value)
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"layer indices are not contiguous: {sorted(layers)}")
        ordered = [layers[i] for i in range(len(layers))]
        out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *ordered)
    return out


def unstack_layers(tree):
    """Inverse of ``stack_layers``."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers" and isinstance(value, dict):
            n = jax.tree.leaves(value)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), value)
        else:
            out[key] = unstack_layers(value)
    return out


def is_stacked(tree) -> bool:
    if not isinstance(tree, dict):
        return False
    return "layers" in tree or any(is_stacked(v) for v in tree.values())


def layer_stack(layer_cls, num_layers: int, scan: bool, in_axes: tuple, *args, **kwargs):
    """``num_layers`` of ``layer_cls(*args, **kwargs)``: one scanned module named ``layers`` (see
    ``scanned``), or a list of modules named ``layers_{i}``, created in the calling module's scope."""
    if scan:
        return scanned(layer_cls, num_layers, in_axes)(*args, name="layers", **kwargs)
    return [layer_cls(*args, name=f"layers_{i}", **kwargs) for i in range(num_layers)]
