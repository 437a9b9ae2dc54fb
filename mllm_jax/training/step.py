"""The train step of a stage, built in one place for training (``train.Trainer``) and for planning
(``aot.Planner``): the state a stage starts from and the jitted ``train_step(state, batch, rng)``.

State is ``{"trainable", "frozen", "opt_state", "step"}``: the stage's ``trainable`` path patterns split
the params, so frozen params get no gradients and no optimizer state; a LoRA stage adds its factors
under ``trainable["lora"]``; a DPO stage keeps its starting trainable params as ``"reference"`` (dpo.py).
``init_state`` takes params placed on the mesh and returns the state placed
there too, or, given ``ShapeDtypeStruct``s with shardings, the same state abstractly: nothing is
allocated, which is how ``plan`` compiles a 7B step on a laptop.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import optax

from mllm_jax import sharding
from mllm_jax.models import params as param_tree
from mllm_jax.training import dpo, lora, optim, xent
from mllm_jax.training.runconfig import Stage

# what a step reads of a batch (the pipeline also yields host-only keys, such as image positions)
BATCH_KEYS = (
    *("images", "tokens", "targets", "loss_mask", "attention_mask", "text_tokens", "text_mask"),
    *("segment_ids", "positions"),  # packed rows (data/packing.py)
)


def lm_loss(model, params, batch, rng, chunk: int = 0):
    """Summed next-token NLL over target tokens, with ``count`` (target tokens) and ``correct``;
    ``chunk`` > 0: the LM head and the loss run ``chunk`` tokens at a time (xent.py)."""
    del rng
    # InstructBLIP: the Q-Former reads the instruction too (text_tokens with data.text_source="prompt")
    extra = (
        {"qformer_tokens_BxT": batch["text_tokens"], "qformer_mask_BxT": batch["text_mask"]}
        if "text_tokens" in batch
        else {}
    )
    # packed rows: positions restart per example and the mask is the segment ids (data/packing.py)
    segments = batch.get("segment_ids", batch["attention_mask"])
    args = ({"params": params}, batch["tokens"], batch["images"], batch.get("positions"), segments)
    mask = batch["loss_mask"].astype(jnp.float32)
    own = {}
    if chunk:
        hidden, path = xent.final_hidden(model, *args, **extra)
        head = xent.head_fn(model, {"params": params}, path)
        nll, correct = xent.chunked_sums(head, hidden, batch["targets"], mask, chunk)
    else:
        logits, own = _forward(model, args, extra)
        nll, correct = xent.token_sums(logits, batch["targets"], mask)
    aux = {"count": mask.sum(), "correct": correct}
    # a model's own losses are batch means: times the token count (the step's normaliser) they join the
    # objective with their weight, and are logged (loss/<name>) as they are
    for name, (value, weight) in own.items():
        nll, aux[name] = nll + weight * value * aux["count"], value * aux["count"]
    return nll, aux


def _forward(model, args, extra):
    """``(logits, own losses)``: a model with losses of its own beside the LM's (``train_outputs``:
    LLaVA's [RET] retrieval head, models/retrieval.py) returns them as ``{name: (mean, weight)}``."""
    if hasattr(model, "train_outputs"):
        return model.apply(*args, method="train_outputs", **extra)
    return model.apply(*args, **extra)[0], {}


def _padding(batch) -> dict:
    """``data/padding_fraction``: padding tokens / all tokens of the step (every micro-batch)."""
    if "attention_mask" not in batch:
        return {}
    return {"data/padding_fraction": 1.0 - jnp.mean((batch["attention_mask"] > 0).astype(jnp.float32))}


def make_train_step(
    model, tx: optax.GradientTransformation, lr_fn, grad_accum: int, loss_fn=lm_loss, reference_fn=None
):
    """``train_step(state, batch, rng) -> (state, metrics)``.

    ``loss_fn(model, params, batch, rng) -> (loss_sum, aux)`` sums over the batch; ``aux`` holds
    ``count`` (what the sums are normalised by: target tokens, or examples), ``correct`` and any
    other sums, logged as ``loss/<name>`` (a name with a ``/`` as it is: ``dpo/loss``). With
    ``reference_fn(model, params, batch) -> dict`` (DPO), each (micro-)batch first gets the arrays it
    computes on the reference params, ``state["reference"]`` merged with the frozen ones.
    The batch is split into ``grad_accum`` micro-batches whose
    summed gradients are normalised by the total count, so accumulation gives the same update as one
    big batch (for token-level losses). A step whose loss or gradients are not finite leaves the
    params and optimizer state as they were and reports ``skipped = 1``.
    """

    def grads_of(trainable, frozen, batch, rng, reference):
        if reference_fn is not None:
            batch = batch | reference_fn(model, param_tree.merge_params(reference, frozen), batch)
        fn = lambda t: loss_fn(model, param_tree.merge_params(t, frozen), batch, rng)  # noqa: E731
        (loss_sum, aux), grads = jax.value_and_grad(fn, has_aux=True)(trainable)
        return grads, loss_sum, aux

    def train_step(state, batch, rng):
        trainable, frozen, reference = state["trainable"], state["frozen"], state.get("reference")
        if grad_accum == 1:
            grads, loss_sum, aux = grads_of(trainable, frozen, batch, rng, reference)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )

            def body(carry, mb_rng):
                mb, r = mb_rng
                g, loss_sum, aux = grads_of(trainable, frozen, mb, r, reference)
                return jax.tree.map(jnp.add, carry, (g, loss_sum, aux)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, trainable, frozen, first, rng, reference)
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
            **_padding(batch),
            "skipped": 1.0 - finite.astype(jnp.float32),
            **{
                (k if "/" in k else f"loss/{k}"): v / denom
                for k, v in aux.items()
                if k not in ("count", "correct")
            },
        }
        return new_state, metrics

    return train_step


def is_abstract(tree) -> bool:
    return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _placed(fn, out_shardings, *args, abstract: bool):
    """``fn(*args)`` computed straight into ``out_shardings`` (jit would otherwise leave what it makes on
    one device), or, ``abstract``, its ShapeDtypeStructs with those shardings."""
    if not abstract:
        return jax.jit(fn, out_shardings=out_shardings)(*args)
    shapes = jax.eval_shape(fn, *args)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, out_shardings
    )


def init_state(stage: Stage, params, mesh, seed: int, start: int = 0):
    """``(state, tx, lr_fn)`` for ``stage`` from ``params`` (arrays, or ShapeDtypeStructs, each with its
    sharding): Adam moments take their param's sharding, LoRA factors their kernel's (``A`` like its
    input dims, ``B`` like its output dim), scalars are replicated. Stable shardings are also what keeps
    the step from recompiling after step one."""
    abstract = is_abstract(params)
    trainable, frozen = param_tree.split_params(params, stage.trainable)
    if stage.lora.enabled:  # B = 0: the stage starts exactly at its base
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
        init = functools.partial(lora.init_factors, params=shapes, config=stage.lora)
        out = lora.factor_shardings(frozen, jax.eval_shape(init, jax.random.key(0)))
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.name.encode()))
        trainable = {**trainable, lora.KEY: _placed(init, out, key, abstract=abstract)}
    tx, lr_fn = optim.make_optimizer(stage.optim, stage.steps)
    replicated = sharding.replicated(mesh)
    reference = {}
    if stage.loss == "dpo":  # the stage's starting point, frozen (LoRA: the base, factors off)
        start_params = lora.split_off(trainable)[0]
        keep = jax.tree.map(lambda x: x.sharding, start_params)
        reference["reference"] = _placed(
            lambda t: jax.tree.map(jnp.copy, t), keep, start_params, abstract=abstract
        )
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
        "opt_state": _placed(tx.init, opt_shardings, trainable, abstract=abstract),
        "step": (
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
            if abstract
            else jax.device_put(jnp.asarray(start, jnp.int32), replicated)
        ),
        **reference,
    }
    return state, tx, lr_fn


def jit_step(model, stage: Stage, tx, lr_fn, loss_fn, state, mesh):
    """The stage's ``train_step`` jitted as every step runs it: the state keeps its layout (and is
    donated), the scalar metrics are replicated; a LoRA stage merges its factors inside the step."""
    if stage.lora.enabled:
        loss_fn = lora.merging(loss_fn, stage.lora.scale)
    reference_fn = dpo.reference_logps if "reference" in state else None
    fn = make_train_step(model, tx, lr_fn, stage.grad_accum, loss_fn, reference_fn)
    out = (jax.tree.map(lambda x: x.sharding, state), sharding.replicated(mesh))
    return jax.jit(fn, out_shardings=out, donate_argnums=0)


def device_batch(batch: dict, mesh) -> dict:
    """A host batch (numpy, this process's rows) as global arrays sharded over data x fsdp."""
    on_batch = sharding.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(on_batch, v) for k, v in batch.items() if k in BATCH_KEYS
    }
