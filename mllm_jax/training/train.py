"""The training loop: stages run in sequence through one jitted ``train_step``.

State is ``{"trainable", "frozen", "opt_state", "step"}``: each stage splits the params by its
``trainable`` path patterns, so frozen params get no gradients and no optimizer state. Checkpoints
(orbax, in ``WORKDIR/checkpoints``) hold the full params, the optimizer state, the data iterator state
and where in which stage we are; rerunning the same command resumes from the newest one. SIGTERM
saves at the next step boundary and exits with code 143.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mllm_jax import sharding
from mllm_jax.errors import Diverged, Preempted
from mllm_jax.training import checkpoint, logger, lora, optim
from mllm_jax.training.runconfig import RunConfig, Stage

PREEMPTED_EXIT_CODE = 143


# Fault injection for operations tests: global steps (1-based, comma-separated) whose batches get NaN
# pixels, e.g. MLLM_JAX_INJECT_NAN_STEPS=5,6. Unset in normal runs.
INJECT_NAN_ENV = "MLLM_JAX_INJECT_NAN_STEPS"


def _injected_nan_steps() -> frozenset[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    return frozenset(int(x) for x in raw.split(",") if x.strip())


# ---------------------------------------------------------------- the step


def lm_loss(model, params, batch, rng):
    """Summed next-token NLL over target tokens, with ``count`` (target tokens) and ``correct``."""
    del rng
    # InstructBLIP: the Q-Former reads the instruction too (text_tokens with data.text_source="prompt")
    extra = (
        {"qformer_tokens_BxT": batch["text_tokens"], "qformer_mask_BxT": batch["text_mask"]}
        if "text_tokens" in batch
        else {}
    )
    logits, _ = model.apply(
        {"params": params}, batch["tokens"], batch["images"], None, batch["attention_mask"], **extra
    )
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = batch["targets"]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (nll * mask).sum(), {"count": mask.sum(), "correct": (correct * mask).sum()}


def make_train_step(model, tx: optax.GradientTransformation, lr_fn, grad_accum: int, loss_fn=lm_loss):
    """``train_step(state, batch, rng) -> (state, metrics)``.

    ``loss_fn(model, params, batch, rng) -> (loss_sum, aux)`` sums over the batch; ``aux`` holds
    ``count`` (what the sums are normalised by: target tokens, or examples), ``correct`` and any
    other sums, logged as ``loss/<name>``. The batch is split into ``grad_accum`` micro-batches whose
    summed gradients are normalised by the total count, so accumulation gives the same update as one
    big batch (for token-level losses). A step whose loss or gradients are not finite leaves the
    params and optimizer state as they were and reports ``skipped = 1``.
    """

    def grads_of(trainable, frozen, batch, rng):
        fn = lambda t: loss_fn(model, optim.merge_params(t, frozen), batch, rng)  # noqa: E731
        (loss_sum, aux), grads = jax.value_and_grad(fn, has_aux=True)(trainable)
        return grads, loss_sum, aux

    def train_step(state, batch, rng):
        trainable, frozen = state["trainable"], state["frozen"]
        if grad_accum == 1:
            grads, loss_sum, aux = grads_of(trainable, frozen, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )

            def body(carry, mb_rng):
                mb, r = mb_rng
                g, loss_sum, aux = grads_of(trainable, frozen, mb, r)
                return jax.tree.map(jnp.add, carry, (g, loss_sum, aux)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, trainable, frozen, first, rng)
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            rngs = jax.random.split(rng, grad_accum)
            (grads, loss_sum, aux), _ = jax.lax.scan(body, init, (micro, rngs))
        denom = jnp.maximum(aux["count"], 1.0)
        # keep each gradient in its param's dtype (bf16 params: f32 moments would recompile the step)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # a non-finite step changes nothing but the step counter (the data it read is consumed)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = dict(
            state,
            trainable=keep(new_trainable, trainable),
            opt_state=keep(opt_state, state["opt_state"]),
            step=state["step"] + 1,
        )
        metrics = {
            "loss": loss_sum / denom,
            "accuracy": aux["correct"] / denom,
            "grad_norm": grad_norm,
            "learning_rate": lr_fn(state["step"]),
            "target_tokens": aux["count"],
            "skipped": 1.0 - finite.astype(jnp.float32),
            **{f"loss/{k}": v / denom for k, v in aux.items() if k not in ("count", "correct")},
        }
        return new_state, metrics

    return train_step


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
        from mllm_jax.training import wiring  # model, tokenizer and data wiring

        self.run_config, self.workdir = run, workdir
        self.mesh = sharding.make_mesh(dataclasses.asdict(run.mesh), devices)
        self._step_fns: dict = {}
        self.rules = sharding.rules(run.sharding_rules)
        self.setup = wiring.RunSetup(run, workdir, self.mesh.devices.size)
        self.model = self.setup.model
        self.stop_requested = False
        self.skipped_steps = 0  # non-finite steps skipped so far in this run (kept in checkpoints)
        self.writer = None
        self._check_trainable()
        self.ckpt = None

    def _check_trainable(self):
        paths = optim.flatten(_unbox(jax.eval_shape(self.setup.init_fn, jax.random.key(0))))
        for stage in self.run_config.stages:
            if not any(optim.matches(p, stage.trainable) for p in paths):
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
        boxed = jax.eval_shape(self.setup.init_fn, jax.random.key(0))
        abstract = _unbox(boxed)
        return abstract, sharding.fit_to_shapes(sharding.shardings_of(boxed, self.mesh, self.rules), abstract)

    def _initial_params(self, resume: Resume | None):
        abstract, shardings = self._abstract_params()
        if resume is not None:
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
            )
            return self.ckpt.restore(resume.global_step, "params", target), shardings
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
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
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
                if self._agree_on_stop() and index + 1 < len(self.run_config.stages):
                    raise Preempted(f"stopped by SIGTERM at the end of stage {stage.name}; state saved")
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.writer.close()
            self.ckpt.close()
        return params

    def _agree_on_stop(self) -> bool:
        """Whether to stop now. Multi-host: every host stops at the same step if any host got SIGTERM
        (each may get the notice at a different step): one tiny all-gather per step, and the decision
        is this call's value, not a flag the signal handler may still change. Single host: the flag."""
        stop = self.stop_requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
        return stop

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM: saving at the next step boundary")
        self.stop_requested = True

    def _find_resume(self) -> Resume | None:
        step = self.ckpt.latest_step()
        if step is None:
            return None
        meta = self.ckpt.restore(step, "meta")
        names = [s.name for s in self.run_config.stages]
        if meta["stage"] not in names:
            raise ValueError(
                f"{self.workdir}: checkpoint is in stage {meta['stage']!r}, not in stage_order {names}"
            )
        data_state = self.ckpt.restore(step, "data") if meta.get("has_data") else None
        return Resume(
            names.index(meta["stage"]),
            meta["stage_step"],
            step,
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
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state["opt_state"]
            )
            state["opt_state"] = self.ckpt.restore(resume.global_step, "opt_state", target)
            if stage.lora.enabled:  # the factors trained so far (the params item holds the base)
                target = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                    state["trainable"][lora.KEY],
                )
                state["trainable"][lora.KEY] = self.ckpt.restore(resume.global_step, lora.KEY, target)
            if resume.data_state is not None:
                iterator.set_state(checkpoint.decode_state(resume.data_state))
        progress = logger.Progress(stage.name, start, stage.steps)
        key = jax.random.key(run.seed)
        logging.info(
            "stage %s: steps %d..%d, trainable %s", stage.name, start, stage.steps, list(stage.trainable)
        )
        eval_every = run.eval.every
        inject = _injected_nan_steps()
        bad_streak, pending = 0, None
        window_t0, window_tokens, window_steps = time.time(), 0, 0
        for s in range(start, stage.steps):
            batch = next(iterator)
            if offset + s + 1 in inject:
                batch = dict(batch, images=batch["images"] * np.float32("nan"))
            window_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            state, metrics = self.step(stage, tx, lr_fn, state, batch, jax.random.fold_in(key, offset + s))
            window_steps += 1
            done = s + 1
            stop = self._agree_on_stop()
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
                row = {
                    "stage": stage.name,
                    "stage_step": done,
                    **{k: float(v) for k, v in metrics.items() if k != "skipped"},
                    "tokens_per_sec": window_tokens / elapsed,
                    "steps_per_sec": window_steps / elapsed,
                }
                row["train/skipped_steps"] = self.skipped_steps
                row.update(self.setup.mfu(row["steps_per_sec"], stage))
                row.update(self.setup.data_counters())
                self.writer.write(offset + done, row)
                progress.update(done, row["loss"])
                window_t0, window_tokens, window_steps = time.time(), 0, 0
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
        params = optim.merge_params(state["trainable"], state["frozen"])
        if not stage.lora.enabled:
            return params
        merge = jax.jit(lambda t: lora.merged(t, stage.lora.scale), out_shardings=shardings)
        return merge(params)

    def stage_state(self, stage: Stage, params, start: int = 0):
        """``(state, tx, lr_fn)`` for ``stage``, every leaf placed on the mesh: Adam moments take their
        param's sharding (jit would otherwise leave the zeros it makes on one device), scalars are
        replicated. Stable shardings are also what keeps the step from recompiling after step one."""
        trainable, frozen = optim.split_params(params, stage.trainable)
        if stage.lora.enabled:  # B = 0: the stage starts exactly at its base
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
            init = functools.partial(lora.init_factors, params=shapes, config=stage.lora)
            abstract = jax.eval_shape(init, jax.random.key(0))
            out = lora.factor_shardings(frozen, abstract)
            key = jax.random.fold_in(jax.random.key(self.run_config.seed), zlib.crc32(stage.name.encode()))
            trainable = {**trainable, lora.KEY: jax.jit(init, out_shardings=out)(key)}
        tx, lr_fn = optim.make_optimizer(stage.optim, stage.steps)
        replicated = sharding.replicated(self.mesh)
        opt_shardings = optax.tree_utils.tree_map_params(
            tx,
            lambda _, s: s,
            jax.eval_shape(tx.init, trainable),
            jax.tree.map(lambda x: x.sharding, trainable),
            transform_non_params=lambda _: replicated,
        )
        state = {
            "trainable": trainable,
            "frozen": frozen,
            "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(trainable),
            "step": jax.device_put(jnp.asarray(start, jnp.int32), replicated),
        }
        return state, tx, lr_fn

    def step(self, stage: Stage, tx, lr_fn, state, batch: dict, rng):
        """One jitted step on a host batch (numpy), sharded over data x fsdp; compiled once per stage."""
        key = (stage.name, id(tx))
        if self._step_fns.get("key") != key:
            loss_fn = self.setup.loss_fn(stage)
            if stage.lora.enabled:
                loss_fn = lora.merging(loss_fn, stage.lora.scale)
            fn = make_train_step(self.model, tx, lr_fn, stage.grad_accum, loss_fn)
            # the state keeps its layout; the scalar metrics are replicated
            out = (jax.tree.map(lambda x: x.sharding, state), sharding.replicated(self.mesh))
            self._step_fns = {"key": key, "fn": jax.jit(fn, out_shardings=out, donate_argnums=0)}
        batch_sharding = sharding.batch_sharding(self.mesh)
        device_batch = {
            k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()
            if k in BATCH_KEYS
        }
        with sharding.activation_context(self.mesh, self.rules):
            return self._step_fns["fn"](state, device_batch, rng)

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
            params = optim.merge_params(trainable, state["frozen"])
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
            data_state=checkpoint.encode_state(iterator.get_state()) if opt else None,
            wait=wait,
            lora=factors,
        )

    def _evaluate(self, global_step, stage, params):
        rows = self.setup.evaluate(params, stage)
        if rows:
            self.writer.write(global_step, {"stage": stage.name, **rows})
            logging.info(
                "eval at step %d: %s",
                global_step,
                ", ".join(f"{k}={v:.3f}" for k, v in rows.items() if isinstance(v, float)),
            )


BATCH_KEYS = ("images", "tokens", "targets", "loss_mask", "attention_mask", "text_tokens", "text_mask")


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def train(run: RunConfig, workdir: str):
    trainer = Trainer(run, workdir)
    return trainer.run()
