"""One LLaVA train step on 8 simulated CPU devices under several meshes (run by tests/test_sharding.py in
a subprocess, since the device count is fixed when JAX starts). Prints one JSON line per mesh."""

import os
import sys

if __name__ == "__main__":  # only as a script: importing this module must not change the importer's JAX
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mllm_jax

import importlib.util  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mllm_jax import optim, runconfig, train  # noqa: E402

MESHES = {"single": None, "d2f2t2": dict(data=2, fsdp=2, tensor=2), "fsdp8": dict(data=1, fsdp=8, tensor=1)}


def load_config():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("llava_cfg", os.path.join(root, "configs", "llava.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.model.vision.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4)
    c.model.llm.update(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    c.stages.instruct.batch_size = 8
    c.stages.instruct.warmup_steps = 0  # a real update on the first step
    c.tensorboard = False
    c.eval.num_questions = 0
    return c


def one_step(name, mesh):
    c = load_config()
    if mesh is None:
        devices = jax.devices()[:1]
        c.mesh.update(data=1, fsdp=1, tensor=1)
    else:
        devices = jax.devices()
        c.mesh.update(**mesh)
    run = runconfig.from_config_dict(c)
    trainer = train.Trainer(run, tempfile.mkdtemp(), devices=devices)
    params, _ = trainer._initial_params(None)
    stage = run.stages[1]
    state, tx, lr = trainer.stage_state(stage, params)
    batch = next(trainer.setup.data_iterator(stage, seed=0))
    state, metrics = trainer.step(stage, tx, lr, state, batch, 0)
    kernel = state["trainable"]["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    moment = state["opt_state"][1][0].mu["llm"]["layers_0"]["mlp"]["up_proj"]["kernel"]  # clip, then adamw
    shard_shapes = sorted({tuple(s.data.shape) for s in kernel.addressable_shards})
    flat = optim.flatten(jax.device_get(state["trainable"]))
    return {
        "mesh": name,
        "loss": float(metrics["loss"]),
        "params": {k: np.asarray(v).ravel()[:64].tolist() for k, v in sorted(flat.items())},
        "param_sums": {k: float(np.asarray(v, np.float64).sum()) for k, v in sorted(flat.items())},
        "up_proj_shape": list(kernel.shape),
        "up_proj_shards": [list(s) for s in shard_shapes],
        "devices": len(kernel.sharding.device_set),
        "moment_shards": [list(x) for x in sorted({tuple(s.data.shape) for s in moment.addressable_shards})],
    }


if __name__ == "__main__":
    for name in sys.argv[1:] or MESHES:
        print(json.dumps(one_step(name, MESHES[name])), flush=True)
