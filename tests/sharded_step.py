"""One train step per family and stage on 8 simulated CPU devices under sharded meshes (run by
tests/test_sharding.py in a subprocess, since the device count is fixed when JAX starts).

    python tests/sharded_step.py OUT_DIR [CASE ...]

Each case is one family's stage on a shrunken tiny config, built through ``train.Trainer`` as training
builds it (its mesh, param shardings, stage state, loss, jitted step and data iterator). The params are
initialised once on one device and take one step there; each of the case's sharded meshes (``CASES``)
then places them with the Trainer's shardings (as it places pretrained weights) and takes one step on
the same batch. Per (case, mesh) it prints one JSON line (metrics, and the shard shapes of every
trainable param and of its Adam moments) and writes ``OUT_DIR/<case>-<mesh>.npz`` (every param after
the step, ``mu/<path>``: Adam's first moments) and ``OUT_DIR/<case>-init.npz`` (the params before the
step).

Adam's ``eps`` is raised to ``EPS``: Adam's first update is ``lr * g / (|g| + eps)``, i.e. ``lr * sign(g)``
for the default 1e-8, which turns float32 rounding in near-zero gradient entries (~1e-5 apart between
reduction orders: pure data parallelism shows the same on BLIP-2's ITC) into jumps of up to ``2 * lr``.
With ``EPS`` the update is a smooth function of the gradient, so equal params mean equal gradients.
"""

import os
import sys

if __name__ == "__main__":  # only as a script: importing this module must not change the importer's JAX
    # the last two halve compile times (every mesh compiles with them)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's mllm_jax

import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mllm_jax.models import params as param_tree  # noqa: E402
from mllm_jax.training import presets, runconfig, train  # noqa: E402

MESHES = {"single": None, "d2f2t2": dict(data=2, fsdp=2, tensor=2), "fsdp8": dict(data=1, fsdp=8, tensor=1)}
EPS = 1e-2
BATCH = 8

SMALL_VIT = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4)
SMALL_LLM = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4)


def _load(name: str, arg: str = "tiny"):
    c = presets.load(os.path.join(ROOT, "configs", f"{name}.py") + f":{arg}")
    c.tensorboard = False
    c.eval.num_questions = 0
    c.eval.num_retrieval = 0
    return c


def llava(arg: str = "tiny"):
    c = _load("llava", arg)
    c.model.vision.update(SMALL_VIT)
    c.model.llm.update(SMALL_LLM, num_kv_heads=2, head_dim=8)
    return c


def flamingo(use_resampler: bool):
    c = _load("flamingo")
    c.model.use_resampler = use_resampler  # tiny: False; the perceiver must shard too
    c.model.vision.update(SMALL_VIT)
    c.model.llm.update(SMALL_LLM, num_kv_heads=2, head_dim=8)
    c.model.cross_layer_interval = 1  # a gated block before the one decoder layer
    c.model.perceiver.update(num_latents=4, num_heads=4, head_dim=8, mlp_dim=64)
    c.model.xattn.update(intermediate_size=64, num_heads=4, head_dim=8)
    return c


def blip2():
    c = _load("blip2")
    c.model.vision.update(SMALL_VIT)
    c.model.qformer.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4)
    c.model.llm.update(SMALL_LLM)
    c.model.num_query_tokens = 4
    c.model.itc_embed_dim = 16
    return c


# case -> (config, stage, sharded meshes). Flamingo's align stage trains everything (tower included, up
# to 3 images a sample); BLIP-2's qformer stage is stage 1 (ITC over the global batch, ITM with in-batch
# hard negatives, ITG) without the LLM, its generate stage the LM loss through Q-Former and LLM.
# Each family runs under both sharded meshes: LLaVA's one case under each, the other families' cases
# under one each (they share their towers, blocks and shardings): the perceiver and the Q-Former under
# d2f2t2 (data, fsdp and tensor at once), the tower straight into the gated blocks and the OPT LLM
# with the language projection under fsdp8 (every kernel split 8 ways). Each sharded compile costs
# 4-12 s.
CASES = {
    "llava": (llava, "instruct", ("d2f2t2", "fsdp8")),
    "flamingo": (lambda: flamingo(False), "align", ("fsdp8",)),
    "flamingo_resampler": (lambda: flamingo(True), "align", ("d2f2t2",)),
    "blip2_qformer": (blip2, "qformer", ("d2f2t2",)),
    "blip2_generate": (blip2, "generate", ("fsdp8",)),
}


def trainer_for(case: str, mesh_name: str):
    build, stage_name, _ = CASES[case]
    c = build()
    c.stage_order = (stage_name,)
    c.stages[stage_name].batch_size = BATCH
    c.stages[stage_name].warmup_steps = 0  # a real update on the first step
    mesh = MESHES[mesh_name]
    if mesh is None:
        devices = jax.devices()[:1]
        c.mesh.update(data=1, fsdp=1, tensor=1)
    else:
        devices = jax.devices()
        c.mesh.update(**mesh)
    run = runconfig.from_config_dict(c)
    (stage,) = run.stages
    stage = dataclasses.replace(stage, optim=dataclasses.replace(stage.optim, eps=EPS))
    run = dataclasses.replace(run, stages=(stage,))
    return train.Trainer(run, tempfile.mkdtemp(), devices=devices), stage


def _shards(x):
    return [list(s) for s in sorted({tuple(s.data.shape) for s in x.addressable_shards})]


def one_step(trainer, stage, params, batch, case: str, mesh_name: str, out_dir: str):
    state, tx, lr = trainer.stage_state(stage, params)
    state, metrics = trainer.step(stage, tx, lr, state, batch, jax.random.fold_in(jax.random.key(0), 0))
    trainable = param_tree.flatten(state["trainable"])
    mu = param_tree.flatten(optax.tree_utils.tree_get(state["opt_state"], "mu"))
    nu = param_tree.flatten(optax.tree_utils.tree_get(state["opt_state"], "nu"))
    after = param_tree.flatten(jax.device_get(param_tree.merge_params(state["trainable"], state["frozen"])))
    after.update({f"mu/{k}": v for k, v in jax.device_get(mu).items()})
    np.savez(os.path.join(out_dir, f"{case}-{mesh_name}.npz"), **after)
    return {
        "case": case,
        "mesh": mesh_name,
        "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
        # path -> [shape, devices, param shard shapes, mu shard shapes, nu shard shapes]
        "shards": {
            k: [list(v.shape), len(v.sharding.device_set), _shards(v), _shards(mu[k]), _shards(nu[k])]
            for k, v in sorted(trainable.items())
        },
    }


def run_case(case: str, out_dir: str):
    host_params = batch = None
    for mesh_name in ("single", *CASES[case][2]):
        t0 = time.time()
        trainer, stage = trainer_for(case, mesh_name)
        if host_params is None:  # the reference: initialised as training does, on one device
            params, _ = trainer._initial_params(None)
            host_params = jax.device_get(params)
            np.savez(os.path.join(out_dir, f"{case}-init.npz"), **param_tree.flatten(host_params))
            batch = next(trainer.setup.data_iterator(stage, seed=0))
        else:
            _, shardings = trainer._abstract_params()
            params = jax.device_put(host_params, shardings)
        row = one_step(trainer, stage, params, batch, case, mesh_name, out_dir)
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    out_dir, cases = sys.argv[1], sys.argv[2:] or list(CASES)
    for case in cases:
        run_case(case, out_dir)
