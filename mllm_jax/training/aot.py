"""Ahead-of-time compilation of a run's train step for a target it is not running on: a TPU slice
(through libtpu's topology descriptions, on this CPU) or N simulated CPU devices.

``Planner`` compiles the step ``train.Trainer`` runs, through the Trainer itself (``stage_state`` and
``step_fn``, both step.py: params sharded by their logical axes, optimizer state and LoRA factors like
their params, the batch over data x fsdp), from abstract shapes only (``ShapeDtypeStruct``s with
shardings), so no weight is ever allocated, and reads XLA's per-chip ``memory_analysis()``.
``mllm_jax.plan`` is the command around it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable

import jax
import numpy as np

from mllm_jax import sharding
from mllm_jax.errors import PlanError
from mllm_jax.models import flops
from mllm_jax.models import params as param_tree
from mllm_jax.training import dpo, step, train

GIB = 1024**3


# ---------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Generation:
    chip_config: str  # libtpu chip config: v4/v5p run their two cores as one device ("megacore")
    cores_per_chip: int  # v4-N and v5p-N count TensorCores, v5e-N and v6e-N count chips
    hbm_gib: float
    accelerator: str  # GCE accelerator-type prefix (v5e slices are "v5litepod-N")
    shapes: dict  # chips -> topology


SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
GENERATIONS = {
    "v4": Generation("megacore", 2, 32, "v4", SHAPES_3D),
    "v5e": Generation("default", 1, 16, "v5litepod", SHAPES_2D),
    "v5p": Generation("megacore", 2, 95, "v5p", SHAPES_3D),
    "v6e": Generation("default", 1, 32, "v6e", SHAPES_2D),
}
# The data config keys that fix a batch's shapes (mllm_jax/data/config.py PARENT_ONLY); packed rows
# add segment ids and positions and lay images out in packed_images slots.
SHAPE_KEYS = ("max_length", "max_images", "text_length", "packing", "packed_images")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "cpu"
    chips: int
    generation: str = ""


def parse_target(name: str) -> Target:
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|cpu)-(\d+)", name or "")
    if not m:
        raise PlanError(
            f"--target {name!r}: expected cpu-N or a TPU slice such as v4-32, v5e-8, v5p-8, v6e-8"
        )
    gen, count = m.group(1), int(m.group(2))
    if gen == "cpu":
        if count < 1:
            raise PlanError(f"--target {name!r}: N must be at least 1")
        return Target(name, "cpu", count)
    g = GENERATIONS[gen]
    chips, odd = divmod(count, g.cores_per_chip)
    if odd or chips not in g.shapes:
        sizes = ", ".join(f"{gen}-{c * g.cores_per_chip}" for c in g.shapes)
        raise PlanError(f"--target {name!r}: not a {gen} slice; known sizes: {sizes}")
    return Target(name, "tpu", chips, gen)


def set_platform_env(target: Target | None):
    """Before JAX's backends start (its first device query). This process only compiles, on the CPU
    platform. ALLOW_MULTIPLE_LIBTPU_LOAD keeps libtpu from taking /tmp/libtpu_lockfile, which another
    JAX process (a test run, a training job) may hold; the TPU_* values spare it a GCE metadata query
    and the warnings it prints without one. ``None``: the CPU only (a bad target, reported later)."""
    jax.config.update("jax_platforms", "cpu")  # JAX read JAX_PLATFORMS when it was imported
    if target is None:
        return
    if target.platform == "cpu":
        # Nothing compiled here ever runs: skip LLVM's optimisations (buffer sizes are fixed before them).
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        return
    g = GENERATIONS[target.generation]
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"
    os.environ["TPU_ACCELERATOR_TYPE"] = f"{g.accelerator}-{target.chips * g.cores_per_chip}"
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"


def target_devices(target: Target) -> list:
    if target.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", target.chips)
        if jax.device_count() != target.chips:
            raise PlanError(f"--target {target.name}: JAX started with {jax.device_count()} CPU devices")
        return jax.devices()
    try:
        import libtpu  # noqa: F401  (optional: the tpu extra)
    except ImportError:
        raise PlanError(f"--target {target.name} needs libtpu: pip install -e '.[tpu]'") from None
    from jax.experimental import topologies

    g = GENERATIONS[target.generation]
    dims = [int(x) for x in g.shapes[target.chips].split("x")] + [1]
    # One host holds a whole v5e/v6e slice of up to 8 chips; bigger slices (and v4/v5p) have 4 per host.
    host = (2, 4, 1) if g.shapes is SHAPES_2D and target.chips == 8 else (2, 2, 1)
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{target.generation}:{g.shapes[target.chips]}",
        chip_config_name=g.chip_config,
        chips_per_host_bounds=tuple(min(h, d) for h, d in zip(host, dims, strict=False)),
        num_slices=1,
    )
    return list(topology.devices)


def memory_limit(target: Target) -> float:
    """Bytes per chip: the chip's HBM; simulated CPU devices share the host's RAM."""
    if target.platform == "tpu":
        return GENERATIONS[target.generation].hbm_gib * GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / target.chips


# ---------------------------------------------------------------- the step, abstractly


class Planner:
    """Compiles one stage's train step on the target's devices, as ``train.Trainer`` runs it, for any
    remat policy and per-chip batch; every result is kept in ``trials``."""

    def __init__(self, run, devices: list, workdir: str, remat: str, stage_name: str | None, log=None):
        self.run, self.devices, self.workdir = run, devices, workdir
        self.log: Callable[[str], None] = log or (lambda message: None)
        self._trainers: dict = {}
        self._example: dict | None = None
        self.trainer = self.trainer_for(remat)
        self.stage = self._pick_stage(stage_name)
        self.trials: dict = {}  # (remat, per-chip batch) -> memory
        self.drift: list[str] | None = None  # state leaves the step returns with another dtype or shape

    def trainer_for(self, remat: str) -> train.Trainer:
        """A Trainer of the run with ``remat`` on the target's devices (the attention kernel is chosen
        for their platform, not for this CPU host)."""
        if remat not in self._trainers:
            run = dataclasses.replace(self.run, model=dataclasses.replace(self.run.model, remat=remat))
            self._trainers[remat] = train.Trainer(run, self.workdir, devices=self.devices)
        return self._trainers[remat]

    def _pick_stage(self, name: str | None):
        names = [s.name for s in self.run.stages]
        if name is not None:
            if name not in names:
                raise PlanError(f"--stage {name!r}: the config's stages are {names}")
            return self.run.stages[names.index(name)]
        flat = param_tree.flatten(self.trainer.abstract_params())

        def weight(stage) -> tuple[int, int]:  # ties: the one with more tokens per step
            trainable = sum(
                math.prod(v.shape) for k, v in flat.items() if param_tree.matches(k, stage.trainable)
            )
            return trainable, stage.batch_size * stage.data.max_length

        return max(reversed(self.run.stages), key=weight)

    def abstract_state(self, trainer: train.Trainer | None = None):
        """``(state, tx, lr_fn)`` of the stage as ``trainer`` (default: the configured remat's) starts
        it, as ShapeDtypeStructs with their shardings: LoRA factors included."""
        trainer = trainer or self.trainer
        return trainer.stage_state(self.stage, trainer.abstract_params())

    def example(self) -> dict:
        """One example as the data pipeline makes it (keys, dtypes, shapes), from the built-in
        synthetic source with the stage's lengths: the stage's own data need not be on this machine."""
        if self._example is None:
            d = self.stage.data
            shapes = {k: getattr(d, k) for k in SHAPE_KEYS}
            task = "preference" if self.stage.loss == "dpo" else "vqa"  # DPO: pairs, tokens [B, 2, T]
            data = type(d)(source="synthetic", task=task, shuffle=False, size=1, **shapes)
            example = next(
                self.trainer.setup.data_iterator(dataclasses.replace(self.stage, batch_size=1, data=data), 0)
            )
            self._example = {k: v for k, v in example.items() if k in step.BATCH_KEYS}
        return self._example

    def compile(self, remat: str, per_chip: int):
        """The train step ``Trainer.step`` runs (``Trainer.step_fn``), compiled for ``per_chip``
        sequences per chip."""
        trainer = self.trainer_for(remat)
        state, tx, lr_fn = self.abstract_state(trainer)
        mesh = trainer.mesh
        batch_size = per_chip * mesh.shape["data"] * mesh.shape["fsdp"] * self.stage.grad_accum
        on_batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        batch = {
            k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=on_batch)
            for k, v in self.example().items()
        }
        rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
        jitted = trainer.step_fn(self.stage, tx, lr_fn, state)
        with sharding.activation_context(mesh, trainer.rules):  # as Trainer.step traces it
            lowered = jitted.lower(state, batch, rng)
        self.drift = self.drift if self.drift is not None else state_drift(state, lowered.out_info[0])
        return lowered.compile()

    def measure(self, remat: str, per_chip: int) -> dict:
        if (remat, per_chip) not in self.trials:
            t0 = time.time()
            try:
                memory = memory_of(self.compile(remat, per_chip))
            except jax.errors.JaxRuntimeError as e:  # the TPU compiler gives up on a hopeless program
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                memory = memory_of_failure(str(e), state_bytes(self.abstract_state()[0]))
            memory["compile_seconds"] = round(time.time() - t0, 1)
            self.trials[remat, per_chip] = memory
            self.log(f"compiled remat={remat}, {per_chip} per chip: peak {gib(memory['peak'])}")
        return self.trials[remat, per_chip]

    def peak(self, remat: str, per_chip: int) -> float:
        peak = self.measure(remat, per_chip)["peak"]
        return math.inf if peak is None else peak


def memory_of(compiled) -> dict:
    """Per-chip bytes. The donated state is aliased into the outputs, so it counts once."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
    }
    total = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"]
    out["peak"] = max(int(getattr(m, "peak_memory_in_bytes", 0) or 0), total)
    return out


def memory_of_failure(message: str, state: int) -> dict:
    """The TPU compiler stops when the temporaries alone exceed HBM ("... required for HLO temporaries
    (46.16G) exceeds available HBM (15.75G)"): the state plus those temporaries is a lower bound."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    temporaries = int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1)) if m else None
    peak = None if temporaries is None else state + temporaries
    error = next((line for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message)
    return {"temporaries": temporaries, "peak": peak, "lower_bound": True, "error": error.strip()[:300]}


def state_drift(state, new_state) -> list[str]:
    """Leaves whose dtype or shape the step changes: the next step would get other inputs (and compile
    again), and memory would differ from this plan's from the second step on."""
    changes = []
    for (path, old), new in zip(jax.tree.leaves_with_path(state), jax.tree.leaves(new_state), strict=True):
        if (old.shape, old.dtype) != (new.shape, new.dtype):
            changes.append(
                f"{jax.tree_util.keystr(path)}: {old.dtype}{list(old.shape)} -> {new.dtype}{list(new.shape)}"
            )
    return changes


def state_bytes(state) -> int:
    """Bytes of one chip's shard of every state leaf: what sits on a chip before any compute."""
    leaves = jax.tree.leaves(state)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


def step_flops(trainer, stage, state, batch_size: int) -> float:
    """Model FLOPs of one step: 6·N·tokens + attention as ``mllm_jax.models.flops`` counts them, with the
    vision tower's forward only (2·N) when the stage freezes it, since no gradient flows into it."""
    family, c, d = trainer.setup.family, trainer.setup.config, stage.data
    per_sequence = family.flops_per_sequence(c, d.max_length, d.max_images)
    vision = family.vision_config(c)
    if vision is not None and "vision" not in state["trainable"]:
        per_sequence -= 4.0 * flops.vit_params(vision) * vision.num_positions * d.max_images
    pairs = dpo.SEQUENCES_PER_PAIR if stage.loss == "dpo" else 1  # a DPO batch row is a pair
    return batch_size * per_sequence * pairs


def gib(x) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    if x is None:
        return "unknown"
    return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / 2**20:.1f} MiB"
