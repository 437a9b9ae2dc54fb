"""Device mesh and the one table that maps logical axis names onto it.

Modules only name logical axes (``embed``, ``mlp``, ``heads``, ``act_batch``, ...). ``RULES`` says which
mesh axis each one is split over: FSDP shards weights on their ``embed`` dimension, tensor parallelism
splits heads and MLP width, the batch is split over ``data`` x ``fsdp``. A config may override rules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). Keep the vocabulary small.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(spec: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
    """Resolve ``{data, fsdp, tensor}`` with at most one ``-1`` (= the rest) for ``n_devices``."""
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes, strict=True))}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh: {n_devices} devices cannot be split into {known} x (rest)")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} has {math.prod(sizes)} devices, "
            f"but {n_devices} are available"
        )
    return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(overrides: Mapping[str, object] | None = None):
    table = dict(RULES)
    for name, axis in (overrides or {}).items():
        table[name] = tuple(axis) if isinstance(axis, list) else axis
    return tuple(table.items())


def shardings_of(abstract_boxed, mesh: Mesh, rule_table):
    """NamedShardings for a tree of ``nn.Partitioned`` leaves (from ``jax.eval_shape(init)``)."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def fit_to_shapes(shardings, abstract):
    """Replicate any dimension whose size the mesh axes do not divide (tiny models on many devices)."""

    def fix(sharding, leaf):
        spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
        for i, axes in enumerate(spec):
            if axes is None:
                continue
            names = axes if isinstance(axes, tuple) else (axes,)
            if leaf.shape[i] % math.prod(sharding.mesh.shape[n] for n in names):
                spec[i] = None
        return NamedSharding(sharding.mesh, PartitionSpec(*spec))

    return jax.tree.map(fix, shardings, abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activation_context(mesh: Mesh, rule_table):
    """Trace under ``mesh`` with ``rule_table`` so ``layers.constrain`` takes effect: flax's logical
    constraints need an abstract mesh in context; under the legacy ``with mesh:`` they are silently
    dropped. Only the abstract mesh: ``jax.set_mesh`` would also make constants created while tracing
    go to the mesh's devices, which a TPU topology compiled on a CPU (``plan``) does not have."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rule_table):
        yield
