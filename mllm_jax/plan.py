"""Plan a run before renting it: ``python -m mllm_jax.plan --config=configs/llava.py:7b --target=v5e-8``.

Compiles the real train step (the one ``train.Trainer`` runs, built by training/step.py: params by
logical axes, optimizer state and LoRA factors like their params, the batch over data x fsdp) ahead of
time for a TPU slice or for N simulated CPU devices (``cpu-N``), from abstract shapes only: no weight is
ever allocated, so a 7B plan runs on a laptop. Prints one JSON object on stdout and a table on stderr:
per-chip memory from XLA's ``memory_analysis()``, whether it fits, the step's model FLOPs, and
suggestions (the least-recompute remat policy and the largest per-chip batch that fit), each one
checked by compiling it.

TPU targets need libtpu (``pip install -e ".[tpu]"``), used here only as a compiler under the CPU
platform: a plan never touches a TPU, so it can run next to a training job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable

import jax
from absl import app, flags
from ml_collections import config_flags

from mllm_jax import errors, sharding
from mllm_jax.models import flops
from mllm_jax.models.layers import REMAT_POLICIES
from mllm_jax.training import aot, runconfig

FLAGS = flags.FLAGS


def define_flags():
    """Only for the command: importing this module (tests, notebooks) defines no absl flags."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/llava.py:7b.", lock_config=True
    )
    flags.DEFINE_string("target", None, "A TPU slice (v4-32, v5e-8, v5e-16, v5p-8, v6e-8, ...) or cpu-N.")
    flags.DEFINE_string("stage", None, "Stage to plan (default: the one with the most trainable params).")
    flags.DEFINE_integer("batch", None, "Sequences per chip per micro-batch (default: the stage's).")
    flags.DEFINE_string("remat", None, "Remat policy (default: config.model.remat).")
    flags.DEFINE_float("memory_gib", None, "Per-chip memory to plan against (default: the chip's HBM).")
    flags.DEFINE_bool("suggest", True, "Search for the remat policy and the largest batch that fit.")
    flags.DEFINE_integer("max_batch", 256, "The largest per-chip batch the search tries.")


# Remat policies from least recompute (most memory) to most; the suggestion is the first that fits.
RECOMPUTE_ORDER = ("none", "save_dots", "minimal", "full")

# ---------------------------------------------------------------- the searches (pure)


def largest_fitting(measure: Callable[[int], float], start: int, limit: float, cap: int, budget: int = 8):
    """``(b, proven, seen)``: the largest ``b`` in ``[1, cap]`` with ``measure(b) <= limit`` for a measure
    that grows with ``b`` (None if 1 does not fit), using at most ``budget`` measurements. ``proven``: ``b``
    was measured to fit and ``b + 1`` not to (or ``b`` is ``cap``); else ``b`` is the largest seen to fit.
    Memory is close to affine in the batch, so a line through two measurements predicts the boundary
    and the prediction's neighbour checks it: four compilations, typically."""
    seen: dict[int, float] = {}
    b, rounds, check = min(max(start, 1), cap), 0, False
    while True:
        if b not in seen:
            seen[b] = measure(b)
        lo = max((x for x, m in seen.items() if m <= limit), default=0)
        hi = min((x for x, m in seen.items() if m > limit), default=cap + 1)
        if hi == lo + 1 or len(seen) >= budget:
            return (lo or None), hi == lo + 1, seen
        if check:  # b was interpolated: its neighbour across the boundary settles it if the line was right
            check, b = False, b + 1 if seen[b] <= limit else b - 1
            if lo < b < hi:
                continue
        b, check = _next_guess(seen, lo, hi, limit, cap, rounds)
        rounds += 1


def _line(points, limit: float) -> int | None:
    """Where the line through two ``(b, memory)`` points reaches ``limit``; None without a rising line."""
    (b1, m1), (b2, m2) = sorted(points)
    slope = (m2 - m1) / (b2 - b1)
    return b1 + math.floor((limit - m1) / slope) if math.isfinite(slope) and slope > 0 else None


def _next_guess(seen: dict, lo: int, hi: int, limit: float, cap: int, rounds: int) -> tuple[int, bool]:
    """The next batch to measure, and whether it was interpolated (then its neighbour is measured next)."""
    if lo and hi <= cap:  # bracketed: interpolate, bisecting every third round in case memory curves
        finite = sorted(x for x in seen if x <= lo)[-2:] if math.isinf(seen[hi]) else [lo, hi]
        g = None if rounds % 3 == 2 or len(finite) < 2 else _line([(x, seen[x]) for x in finite], limit)
        return (min(max(g, lo + 1), hi - 1), True) if g is not None else ((lo + hi) // 2, False)
    if len(seen) == 1 or rounds >= 3:  # double up or drop to 1; after that, straight to the end
        return ((min(2 * lo, cap) if len(seen) == 1 else cap) if lo else 1), False
    near = sorted(seen, key=lambda x: abs(x - (lo or hi)))[:2]  # extrapolate from the known side
    g = _line([(x, seen[x]) for x in near], limit)
    return (min(max(g, lo + 1), hi - 1, cap) if g is not None else (cap if lo else 1)), False


def least_recompute(fits: Callable[[str], bool], policies, first: str | None = None) -> str | None:
    """The first of ``policies`` (least to most recompute) that fits, or None. More recompute never needs
    more memory, so the fitting policies are a suffix: bisect, starting at ``first`` (already measured)."""
    lo, hi = 0, len(policies)  # the answer's index is in [lo, hi]; len(policies) = none fits
    mid = policies.index(first) if first in policies else (lo + hi) // 2
    while lo < hi:
        if fits(policies[mid]):
            hi = mid
        else:
            lo = mid + 1
        mid = (lo + hi) // 2
    return policies[lo] if lo < len(policies) else None


# ---------------------------------------------------------------- the plan


def make_plan(run, target: aot.Target, config_name: str = "", stage=None, batch=None, remat=None, **search):
    """The plan as a JSON-able dict; ``search``: ``memory_gib``, ``suggest``, ``max_batch``."""
    remat = remat or run.model.remat
    if remat not in REMAT_POLICIES:
        raise errors.PlanError(f"--remat {remat!r}: one of {sorted(REMAT_POLICIES)}")
    devices = aot.target_devices(target)
    try:
        sizes = sharding.mesh_shape(dataclasses.asdict(run.mesh), len(devices))
        shape = dict(zip(sharding.MESH_AXES, sizes, strict=True))
    except ValueError as e:
        raise errors.PlanError(f"config.mesh on {target.name}: {e}") from None
    limit = search["memory_gib"] * aot.GIB if search.get("memory_gib") else aot.memory_limit(target)
    with tempfile.TemporaryDirectory() as workdir:
        planner = aot.Planner(run, devices, os.path.join(workdir, "run"), remat, stage, log=_log)
        st, shards = planner.stage, shape["data"] * shape["fsdp"]
        hosts = len({d.process_index for d in devices})
        micro = st.batch_size // st.grad_accum  # batch_size is the global batch (docs/training.md)
        if batch is None and micro % shards:
            raise errors.PlanError(
                f"stages.{st.name}: a micro-batch of {micro} does not split over data x fsdp = {shards} "
                "devices; pass --batch=N (sequences per chip)"
            )
        per_chip = batch if batch is not None else micro // shards
        if per_chip < 1:
            raise errors.PlanError(f"--batch must be at least 1, got {per_chip}")
        state = planner.abstract_state()[0]
        memory = planner.measure(remat, per_chip)
        batch_size = per_chip * shards * st.grad_accum
        model_flops = aot.step_flops(planner.trainer, st, state, batch_size)
        peak_flops = flops.PEAKS.get(devices[0].device_kind, 0.0)
        count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
        plan = {
            "config": config_name,
            "target": target.name,
            "device_kind": devices[0].device_kind,
            "devices": len(devices),
            "hosts": hosts,
            "mesh": shape,
            "stage": st.name,
            "remat": remat,
            "scan_layers": run.model.scan_layers,
            "dtype": run.dtype,
            "attention": run.attention,
            "param_dtype": run.param_dtype,
            "moment_dtype": st.optim.moment_dtype,
            "loss_chunk": st.loss_chunk,
            "per_chip_batch": per_chip,
            "grad_accum": st.grad_accum,
            "global_batch": batch_size,
            "seq_len": st.data.max_length,
            "params": count(state["trainable"]) + count(state["frozen"]),
            "trainable_params": count(state["trainable"]),
            "state_bytes_per_chip": aot.state_bytes(state),
            "memory": {k: v for k, v in memory.items() if k != "compile_seconds"},
            "memory_limit_bytes": int(limit),
            "fits": planner.peak(remat, per_chip) <= limit,
            "model_flops_per_step": model_flops,
            "peak_flops_per_chip": peak_flops or None,
            "ideal_step_seconds": model_flops / (len(devices) * peak_flops) if peak_flops else None,
        }
        if planner.drift:  # a bug in the step, not in the plan: say so next to the numbers
            plan["state_changes_after_one_step"] = planner.drift
            _log(f"warning: the step changes {len(planner.drift)} state leaves, e.g. {planner.drift[0]}")
        if search.get("suggest", True):
            plan["suggest"] = suggest(planner, remat, per_chip, limit, search.get("max_batch", 256))
        plan["trials"] = [{"remat": r, "per_chip_batch": b, **m} for (r, b), m in planner.trials.items()]
    return plan


def suggest(planner: aot.Planner, remat: str, per_chip: int, limit: float, max_batch: int) -> dict:
    policies = [p for p in RECOMPUTE_ORDER if p in REMAT_POLICIES]
    need = aot.state_bytes(planner.abstract_state()[0])
    if need > limit:  # params and optimizer state alone do not fit: no batch or policy will
        return {
            "remat": None,
            "per_chip_batch": None,
            "note": f"params + optimizer state need {aot.gib(need)} per chip, more than {aot.gib(limit)}: "
            f"use more chips, param_dtype=bfloat16 or stages.{planner.stage.name}.moment_dtype=bfloat16",
        }
    fits = lambda p, b: planner.peak(p, b) <= limit  # noqa: E731
    best_remat = least_recompute(lambda p: fits(p, per_chip), policies, remat)
    # the batch is searched with the configured policy, unless even one sequence per chip needs more
    batch_remat = remat
    if not fits(remat, per_chip) and not fits(remat, 1) and remat != policies[-1]:
        batch_remat = policies[-1]
    best_batch, proven, _ = largest_fitting(
        lambda b: planner.peak(batch_remat, b), per_chip, limit, max_batch
    )
    out = {"remat": best_remat, "per_chip_batch": best_batch, "remat_for_batch": batch_remat}
    out["per_chip_batch_is_largest"] = proven  # else: the largest seen to fit within the search's budget
    st = planner.stage
    if best_batch is None:
        out["note"] = (
            "not even one sequence per chip fits: use more chips, or see docs/scaling.md (Memory) for "
            "bf16 params and moments, splash attention and loss_chunk"
        )
    elif best_batch == max_batch:
        out["note"] = f"the search stopped at --max_batch={max_batch}"
    elif best_batch < per_chip:
        out["note"] = (
            f"to keep stages.{st.name}.batch_size={st.batch_size} (global), raise its grad_accum and "
            "check that with plan: accumulation adds a gradient buffer"
        )
    return out


# ---------------------------------------------------------------- CLI


def _log(message: str):
    print(message, file=sys.stderr, flush=True)


def table(plan: dict) -> str:
    p, m = plan, plan["memory"]
    rows = [
        f"{p['config']} on {p['target']}: {p['devices']} x {p['device_kind']}, mesh {p['mesh']}",
        f"stage {p['stage']}, remat {p['remat']}, {p['per_chip_batch']} x {p['seq_len']} tokens per chip "
        f"(x {p['grad_accum']} micro-batches), {p['params'] / 1e9:.2f}B params",
        f"  {'params + optimizer state':<26}{aot.gib(plan['state_bytes_per_chip']):>12}",
        *(f"  {k:<26}{aot.gib(m[k]):>12}" for k in ("arguments", "temporaries", "generated_code") if k in m),
        f"  {'peak' + (' (at least)' if m.get('lower_bound') else ''):<26}{aot.gib(m['peak']):>12}  of "
        f"{aot.gib(plan['memory_limit_bytes'])}: {'fits' if plan['fits'] else 'DOES NOT FIT'}",
        f"  {'model FLOPs per step':<26}{plan['model_flops_per_step']:>12.3e}",
    ]
    s = plan.get("suggest")
    if s:
        rows.append(f"suggested: remat {s['remat']}, {s['per_chip_batch']} per chip. {s.get('note', '')}")
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None or not FLAGS.target:
        _fail("--config and --target are required")
    try:
        run = runconfig.from_config_dict(FLAGS.config)
    except OSError as e:  # config_flags reports a config file it could not load only when it is read
        _fail(f"--config: {[line for line in str(e).splitlines() if line.strip()][-1].strip()}")
    except errors.ConfigError as e:
        _fail(str(e))
    try:
        target = aot.parse_target(FLAGS.target)
        plan = make_plan(
            run,
            target,
            _flag_value("--config") or "",
            FLAGS.stage,
            FLAGS.batch,
            FLAGS.remat,
            memory_gib=FLAGS.memory_gib,
            suggest=FLAGS.suggest,
            max_batch=FLAGS.max_batch,
        )
    except (errors.ConfigError, errors.PlanError) as e:
        _fail(str(e))
    _log(table(plan))
    print(json.dumps(plan))


def _flag_value(name: str) -> str | None:
    """A flag's value from the raw command line (``--name=v`` or ``--name v``)."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing; a bad flag or config override is one line on stderr and exit code 2."""
    try:
        return FLAGS(argv)
    except Exception as e:  # flags.Error, or the config file or an override failed
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        key = re.match(r"\W*(\w+)", lines[0])  # ml_collections names a missing key alone: "'nope'"
        if key and isinstance(e, KeyError | AttributeError):
            for arg in argv[1:]:
                m = re.match(r"--(config(?:\.\w+)*)(=|$)", arg)
                if m and m.group(1).split(".")[-1] == key.group(1):
                    _fail(f"unknown config key {m.group(1)}")
        _fail(re.sub(r"^[\w.]*Error: ", "", lines[-1] if "Traceback" in str(e) else lines[0]))


def run():
    # JAX's backends read the platform settings when they start, so they are set before any device query.
    try:
        aot.set_platform_env(aot.parse_target(_flag_value("--target") or ""))
    except errors.PlanError:
        aot.set_platform_env(None)  # the bad target is reported once flags are parsed
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
