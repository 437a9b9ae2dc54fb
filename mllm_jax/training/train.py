"""The training loop: stages run in sequence, each through its jitted ``train_step`` (step.py, which
``plan`` compiles too).

State is ``{"trainable", "frozen", "opt_state", "step"}`` (step.py). Checkpoints
(orbax, in ``WORKDIR/checkpoints``) hold the full params, the optimizer state, the data iterator state
and where in which stage we are; rerunning the same command resumes from the newest one. SIGTERM
saves at the next step boundary and exits with code 143.
"""

from __future__ import annotations

import dataclasses
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mllm_jax import distributed, sharding
from mllm_jax.errors import ConfigError, Diverged, Preempted
from mllm_jax.models import params as param_tree
from mllm_jax.training import checkpoint, logger, lora, step, wiring
from mllm_jax.training.runconfig import RunConfig, Stage

PREEMPTED_EXIT_CODE = 143


# Fault injection for operations tests: global steps (1-based, comma-separated) whose batches get NaN
# pixels, e.g. MLLM_JAX_INJECT_NAN_STEPS=5,6. Unset in normal runs.
INJECT_NAN_ENV = "MLLM_JAX_INJECT_NAN_STEPS"


def _injected_nan_steps() -> frozenset[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    return frozenset(int(x) for x in raw.split(",") if x.strip())


# ---------------------------------------------------------------- the loop


@dataclasses.dataclass
class Resume:
    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    data_state: dict | None = None
    has_opt_state: bool = False
    skipped_steps: int = 0


class Trainer:
    """Owns the mesh, model, params and writers of one run; ``run()`` trains every remaining stage."""

    def __init__(self, run: RunConfig, workdir: str, devices=None):
        self.run_config, self.workdir = run, workdir
        self.mesh = sharding.make_mesh(dataclasses.asdict(run.mesh), devices)
        self._step_fns: dict = {}
        self.rules = sharding.rules(run.sharding_rules)
        # the steps compile for the mesh's devices: a TPU slice's when plan compiles on a CPU host
        platform = self.mesh.devices.flat[0].platform
        self.setup = wiring.RunSetup(run, workdir, self.mesh.devices.size, platform=platform)
        self.model = self.setup.model
        self.stop = distributed.StopAgreement()
        self.skipped_steps = 0  # non-finite steps skipped so far in this run (kept in checkpoints)
        self.writer = None
        self._check_trainable()
        self._check_batches()
        self.ckpt = None

    def _check_batches(self):
        """Each stage's global batch splits evenly over the hosts and, per micro-batch, over the devices
        that hold batch rows (data x fsdp): else one line here, not an error deep in a sharded step."""
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        hosts = jax.process_count()
        for stage in self.run_config.stages:
            key = f"config.stages.{stage.name}.batch_size={stage.batch_size}"
            micro = stage.batch_size // stage.grad_accum
            if stage.batch_size % hosts:
                raise ConfigError(f"{key} (the global batch) does not divide over {hosts} processes")
            if micro % rows:
                raise ConfigError(
                    f"{key}: its micro-batches of {micro} (grad_accum={stage.grad_accum}) do not divide over "
                    f"data x fsdp = {rows} devices"
                )

    def _check_trainable(self):
        paths = param_tree.flatten(self._abstract_params()[0])
        for stage in self.run_config.stages:
            if not any(param_tree.matches(p, stage.trainable) for p in paths):
                examples = ", ".join(sorted(paths)[:3])
                raise ValueError(
                    f"config.stages.{stage.name}.trainable {list(stage.trainable)} match no parameter "
                    f"(paths look like {examples})"
                )
            if stage.lora.enabled:
                lora.check_stage(
                    stage.name, {p: v.shape for p, v in paths.items()}, stage.lora, stage.trainable
                )

    # -- params

    def _abstract_params(self):
        """``(shapes, shardings)`` of the params ``init_fn`` makes (in its dtypes)."""
        boxed = jax.eval_shape(self.setup.init_fn, jax.random.key(0))
        abstract = nn.meta.unbox(boxed)
        return abstract, sharding.fit_to_shapes(sharding.shardings_of(boxed, self.mesh, self.rules), abstract)

    def abstract_params(self):
        """The params as training holds them, as ShapeDtypeStructs: ``param_dtype``, laid out on the mesh."""
        abstract, shardings = self._abstract_params()
        dtype = jnp.dtype(self.run_config.param_dtype)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), abstract, shardings
        )

    def _initial_params(self, resume: Resume | None):
        _, shardings = self._abstract_params()
        if resume is not None:
            return self.ckpt.restore(resume.global_step, "params", self.abstract_params()), shardings
        return self.setup.initial_params(shardings), shardings

    # -- stages

    def run(self):
        self.setup.write_run_files()
        self.ckpt = checkpoint.TrainCheckpointer(
            self.workdir, self.run_config.keep_checkpoints, self.run_config.async_checkpoints
        )
        resume = self._find_resume()
        # rows past the checkpoint (all rows, without one) will be written again, identically
        primary = jax.process_index() == 0
        if primary:
            logger.truncate_metrics(self.workdir, resume.global_step if resume is not None else 0)
        self.writer = logger.MetricsWriter(self.workdir, self.run_config.tensorboard, enabled=primary)
        if resume is not None:
            logging.info(
                "resuming from step %d (stage %s, step %d)",
                resume.global_step,
                self.run_config.stages[resume.stage_index].name,
                resume.stage_step,
            )
        params, shardings = self._initial_params(resume)
        self.skipped_steps = resume.skipped_steps if resume is not None else 0
        restore_handler = self.stop.install()
        try:
            offset = 0
            for index, stage in enumerate(self.run_config.stages):
                if resume is not None and index < resume.stage_index:
                    offset += stage.steps
                    continue
                here = resume if resume is not None and index == resume.stage_index else None
                if here is None or here.stage_step < stage.steps:
                    params = self._run_stage(index, stage, params, shardings, offset, here)
                offset += stage.steps
                if self.stop.requested and index + 1 < len(self.run_config.stages):
                    raise Preempted(f"stopped by SIGTERM at the end of stage {stage.name}; state saved")
        finally:
            restore_handler()
            self.writer.close()
            self.ckpt.close()
        return params

    def _find_resume(self) -> Resume | None:
        latest = self.ckpt.latest_step()
        if latest is None:
            return None
        meta = self.ckpt.restore(latest, "meta")
        names = [s.name for s in self.run_config.stages]
        if meta["stage"] not in names:
            raise ValueError(
                f"{self.workdir}: checkpoint is in stage {meta['stage']!r}, not in stage_order {names}"
            )
        data_state = self.ckpt.restore(latest, "data") if meta.get("has_data") else None
        return Resume(
            names.index(meta["stage"]),
            meta["stage_step"],
            latest,
            data_state,
            meta.get("has_opt_state", False),
            int(meta.get("skipped_steps", 0)),
        )

    def _run_stage(self, index: int, stage: Stage, params, shardings, offset: int, resume: Resume | None):
        run = self.run_config
        start = resume.stage_step if resume is not None else 0
        state, tx, lr_fn = self.stage_state(stage, params, start)
        iterator = self.setup.data_iterator(stage, seed=run.seed + 1000 * index)
        if start > 0:
            # each item restored laid out as the fresh state's arrays
            like = lambda name, tree: self.ckpt.restore(  # noqa: E731
                resume.global_step, name, jax.tree.map(checkpoint.abstract, tree)
            )
            state["opt_state"] = like("opt_state", state["opt_state"])
            if stage.lora.enabled:  # the factors trained so far (the params item holds the base)
                state["trainable"][lora.KEY] = like(lora.KEY, state["trainable"][lora.KEY])
            if "reference" in state:  # DPO: the stage's starting params, not the resumed ones
                state["reference"] = like("reference", state["reference"])
            if resume.data_state is not None:
                iterator.set_state(checkpoint.decode_state(self._own_data_state(resume.data_state)))
        progress = logger.Progress(stage.name, start, stage.steps)
        key = jax.random.key(run.seed)
        logging.info(
            "stage %s: steps %d..%d, trainable %s", stage.name, start, stage.steps, list(stage.trainable)
        )
        eval_every = run.eval.every
        inject = _injected_nan_steps()
        bad_streak, pending = 0, None
        window_t0, window_tokens, window_targets, window_steps = time.time(), 0, 0.0, 0
        for s in range(start, stage.steps):
            batch = next(iterator)
            if offset + s + 1 in inject:
                batch = dict(batch, images=batch["images"] * np.float32("nan"))
            window_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            window_targets += float(batch["loss_mask"].sum()) if "loss_mask" in batch else 0.0
            state, metrics = self.step(stage, tx, lr_fn, state, batch, jax.random.fold_in(key, offset + s))
            window_steps += 1
            done = s + 1
            stop = self.stop.at_step(offset + done)
            # Read the skip flag one step late: the next step is already queued, so this costs no stall.
            if pending is not None:
                bad_streak = self._count_skip(pending, bad_streak, offset + done - 1)
            pending = metrics["skipped"]
            log_now = done % run.log_every == 0 or done == stage.steps
            if log_now or stop or done % run.checkpoint_every == 0:
                bad_streak = self._count_skip(pending, bad_streak, offset + done)
                pending = None
            if log_now:
                metrics = jax.device_get(metrics)
                elapsed = max(time.time() - window_t0, 1e-9)
                # tokens and skipped records of every host (a collective, at log steps only)
                hosts = distributed.gather_json([window_tokens, window_targets, self.setup.data_counters()])
                row = {
                    "stage": stage.name,
                    "stage_step": done,
                    **{k: float(v) for k, v in metrics.items() if k != "skipped"},
                    "tokens_per_sec": sum(tokens for tokens, _, _ in hosts) / elapsed,
                    "target_tokens_per_sec": sum(targets for _, targets, _ in hosts) / elapsed,
                    "steps_per_sec": window_steps / elapsed,
                }
                row["train/skipped_steps"] = self.skipped_steps
                row.update(self.setup.mfu(row["steps_per_sec"], stage))
                counters = [counts for _, _, counts in hosts]
                row.update({k: sum(c.get(k, 0) for c in counters) for k in sorted(set().union(*counters))})
                self.writer.write(offset + done, row)
                progress.update(done, row["loss"])
                window_t0, window_tokens, window_targets, window_steps = time.time(), 0, 0.0, 0
            # a stop in the stage's last step finishes the stage (evaluation, final save) first
            if stop and done < stage.steps:
                self._save(offset + done, stage, done, state, iterator, wait=True)
                progress.close()
                raise Preempted(f"stopped by SIGTERM at step {offset + done}; state saved")
            if eval_every and done % eval_every == 0 and done < stage.steps:
                self._evaluate(offset + done, stage, self._params_of(stage, state, shardings))
            if done % run.checkpoint_every == 0 and done < stage.steps:
                self._save(offset + done, stage, done, state, iterator)
        progress.close()
        params = self._params_of(stage, state, shardings)  # LoRA merged: plain params from here on
        self._evaluate(offset + stage.steps, stage, params)
        self._save(
            offset + stage.steps, stage, stage.steps, state, iterator, wait=True, opt=False, params=params
        )
        return params

    def _params_of(self, stage: Stage, state, shardings):
        """The stage's current params, with its LoRA factors merged (laid out like the base)."""
        params = param_tree.merge_params(state["trainable"], state["frozen"])
        if not stage.lora.enabled:
            return params
        merge = jax.jit(lambda t: lora.merged(t, stage.lora.scale), out_shardings=shardings)
        return merge(params)

    def stage_state(self, stage: Stage, params, start: int = 0):
        """``(state, tx, lr_fn)`` for ``stage`` on this run's mesh (``step.init_state``); abstract for
        abstract ``params`` (``plan``)."""
        return step.init_state(stage, params, self.mesh, self.run_config.seed, start)

    def step_fn(self, stage: Stage, tx, lr_fn, state):
        """The jitted step of ``stage`` (``step.jit_step``), built once per stage: what ``step`` runs and
        ``plan`` compiles."""
        key = (stage.name, id(tx))
        if self._step_fns.get("key") != key:
            fn = step.jit_step(self.model, stage, tx, lr_fn, self.setup.loss_fn(stage), state, self.mesh)
            self._step_fns = {"key": key, "fn": fn}
        return self._step_fns["fn"]

    def step(self, stage: Stage, tx, lr_fn, state, batch: dict, rng):
        """One step on a host batch (numpy), sharded over data x fsdp; compiled once per stage."""
        fn = self.step_fn(stage, tx, lr_fn, state)
        with sharding.activation_context(self.mesh, self.rules):
            return fn(state, step.device_batch(batch, self.mesh), rng)

    def _count_skip(self, skipped, bad_streak: int, global_step: int) -> int:
        """Count a finished step's skip flag; stop after ``max_bad_steps`` non-finite steps in a row."""
        if float(skipped) == 0:
            return 0
        self.skipped_steps += 1
        bad_streak += 1
        logging.warning(
            "step %d: non-finite loss or gradients, update skipped (%d in a row)", global_step, bad_streak
        )
        if bad_streak >= self.run_config.max_bad_steps:
            raise Diverged(
                f"{bad_streak} non-finite steps in a row (up to step {global_step}; config.max_bad_steps="
                f"{self.run_config.max_bad_steps}); stopped without saving, the last checkpoint is intact"
            )
        return bad_streak

    def _save(self, global_step, stage, stage_step, state, iterator, wait=False, opt=True, params=None):
        """Mid-stage (``opt``): the base params, the optimizer state, the data position and any LoRA
        factors (item ``lora``, with rank and alpha in ``meta`` so readers can merge them). End of
        stage: ``params`` as given (merged)."""
        trainable, factors = lora.split_off(state["trainable"])
        if params is None:
            params = param_tree.merge_params(trainable, state["frozen"])
        meta = {
            "stage": stage.name,
            "stage_step": stage_step,
            "has_opt_state": opt,
            "has_data": opt,
            "skipped_steps": self.skipped_steps,
        }
        factors = factors if opt else None
        if factors:
            meta[lora.KEY] = {"rank": stage.lora.rank, "alpha": stage.lora.alpha}
        self.ckpt.save(
            global_step,
            params,
            meta,
            opt_state=state["opt_state"] if opt else None,
            data_state=self._data_states(iterator) if opt else None,
            wait=wait,
            lora=factors,
            reference=state.get("reference") if opt else None,
        )

    def _data_states(self, iterator) -> dict:
        """Every host's iterator position (a collective): one JSON item that process 0 writes."""
        states = distributed.gather_json(checkpoint.encode_state(iterator.get_state()))
        return {"processes": states}

    def _own_data_state(self, saved: dict):
        """This host's position from a saved ``data`` item (checkpoints of one process before multi-
        process runs hold the bare state)."""
        states = saved["processes"] if set(saved) == {"processes"} else [saved]
        if len(states) != jax.process_count():
            raise ConfigError(
                f"{self.workdir}: the checkpoint's data position was saved by {len(states)} processes; "
                f"resume with {len(states)} (this run has {jax.process_count()})"
            )
        return states[jax.process_index()]

    def _evaluate(self, global_step, stage, params):
        rows = self.setup.evaluate(params, stage)
        if rows:
            self.writer.write(global_step, {"stage": stage.name, **rows})
            logging.info(
                "eval at step %d: %s",
                global_step,
                ", ".join(f"{k}={v:.3f}" for k, v in rows.items() if isinstance(v, float)),
            )


def train(run: RunConfig, workdir: str):
    trainer = Trainer(run, workdir)
    return trainer.run()
