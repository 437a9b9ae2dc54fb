"""LoRA: low-rank adapters on chosen kernels, trained while the base stays frozen.

A target kernel ``W [in, out]`` (or a scan-stacked ``[L, in, out]``) is used as
``W + scale * A @ B`` with ``A [..., in, r]``, ``B [..., r, out]`` and ``scale = alpha / r``. ``B`` starts
at zero, so a LoRA stage starts exactly at its base model. The factors live in one tree keyed by the
target's param path (``{"llm": {"layers_0": {"self_attn": {"q_proj": {"kernel": {"a": A, "b": B}}}}}}``);
during training it sits under a top-level ``lora`` key next to the trainable params, and the loss merges
it into the base inside the jitted step (``merging``), so gradients reach only ``A``, ``B`` and the
stage's ``trainable`` params. At the end of the stage the factors are merged for good and dropped:
what comes after (evaluation, checkpoints, export, the next stage) sees plain params.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import schema
from mllm_jax.errors import ConfigError
from mllm_jax.models import params as param_tree

KEY = "lora"  # top-level key of the factors in a stage's trainable tree
DEFAULT_TARGETS = (r"llm/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: off
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes (full match) on param paths

    def check(self, where: str):
        """Value checks; whether the targets select kernels is checked against the model (``check_stage``)."""
        schema.positive(self.rank, where + "rank", allow_zero=True)
        schema.number(self.alpha, where + "alpha")
        schema.regexes(self.targets, where + "targets")
        if self.rank and not self.targets:
            raise ConfigError(f"{where}targets is empty: name the kernels to adapt")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _is_stacked(path: str) -> bool:
    return "layers" in path.split("/")  # nn.scan's layout: one leading layer axis


def target_paths(shapes: dict[str, tuple], config: LoraConfig) -> list[str]:
    """Paths of ``{path: shape}`` that ``config.targets`` select (sorted). Raises ``ValueError`` for a
    selected param that is not a kernel: 2-D ``[in, out]``, or ``[L, in, out]`` under a scanned stack."""
    out = []
    for path, shape in sorted(shapes.items()):
        if not any(re.fullmatch(p, path) for p in config.targets):
            continue
        if len(shape) != 2 and not (len(shape) == 3 and _is_stacked(path)):
            raise ValueError(
                f"targets select {path} of shape {tuple(shape)}: LoRA needs a 2-D kernel [in, out] "
                "(or a scan-stacked [layers, in, out])"
            )
        out.append(path)
    return out


def check_stage(stage_name: str, shapes: dict[str, tuple], config: LoraConfig, trainable: Sequence[str]):
    """One-line ``ConfigError`` for targets that select nothing, a non-kernel, or a trainable param."""
    where = f"config.stages.{stage_name}.lora.targets"
    try:
        paths = target_paths(shapes, config)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not paths:
        kernels = [p for p, s in sorted(shapes.items()) if len(s) >= 2 and p.endswith("kernel")]
        raise ConfigError(
            f"{where} {list(config.targets)} match no kernel (kernels look like {', '.join(kernels[:3])})"
        )
    both = [p for p in paths if param_tree.matches(p, trainable)]
    if both:
        raise ConfigError(
            f"{where} and config.stages.{stage_name}.trainable both select {both[0]}: a LoRA target stays "
            "frozen (its update is A @ B), so leave it out of trainable"
        )


def init_factors(rng, params, config: LoraConfig):
    """``{path: {"a": A, "b": B}}`` (nested like ``params``) for every target: ``A`` uniform in
    ``±1/sqrt(in)`` (PEFT's kaiming init), ``B`` zeros, both in the kernel's dtype."""
    flat = param_tree.flatten(params)
    out = {}
    for i, path in enumerate(target_paths({p: v.shape for p, v in flat.items()}, config)):
        w = flat[path]
        *lead, d_in, d_out = w.shape
        bound = 1.0 / d_in**0.5
        key = jax.random.fold_in(rng, i)
        out[f"{path}/a"] = jax.random.uniform(key, (*lead, d_in, config.rank), w.dtype, -bound, bound)
        out[f"{path}/b"] = jnp.zeros((*lead, config.rank, d_out), w.dtype)
    return param_tree.unflatten(out)


def factor_shardings(params, factors):
    """``A`` is split like its kernel's input (and layer) dims, ``B`` like its output dim; the rank
    dim is replicated. So FSDP and tensor parallelism keep the factors next to their kernels."""
    flat = param_tree.flatten(params)
    out = {}
    for path in param_tree.flatten(factors):
        kernel_path, which = path.rsplit("/", 1)
        sharding = flat[kernel_path].sharding
        ndim = flat[kernel_path].ndim
        spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
        spec = spec[:-1] + [None] if which == "a" else spec[:-2] + [None, spec[-1]]
        out[path] = NamedSharding(sharding.mesh, PartitionSpec(*spec))
    return param_tree.unflatten(out)


def split_off(tree):
    """``(params, factors)`` of a tree that may hold the factors under ``KEY`` (else ``{}``)."""
    if KEY not in tree:
        return tree, {}
    return {k: v for k, v in tree.items() if k != KEY}, tree[KEY]


def merged(tree, scale: float):
    """Plain params from a tree that may hold factors under ``KEY``."""
    params, factors = split_off(tree)
    return param_tree.merge_lora(params, factors, scale) if factors else params


def merging(loss_fn, scale: float):
    """``loss_fn(model, params, batch, rng)`` on params whose ``KEY`` factors are merged first; the
    base kernels are constants of the step, so only the factors (and trainable params) get gradients."""

    def fn(model, params, batch, rng):
        return loss_fn(model, merged(params, scale), batch, rng)

    return fn
