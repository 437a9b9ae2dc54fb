"""Decoding sharded over 8 simulated CPU devices gives the tokens (and log-probabilities) of one device:
a tiny LLaVA, a batch that does not divide over the mesh (padded inside), params placed in training's
layout. The device count is fixed when JAX starts, so this file also runs itself as the subprocess (a
background job, tests/jobs.py)."""

import json
import os
import sys

if __name__ == "__main__":  # only as a script: importing this module must not change the importer's JAX
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [os.path.dirname(tests), tests]  # this checkout, tests/jobs.py

import jobs  # noqa: E402
import numpy as np  # noqa: E402
from commands import xla_env  # noqa: E402

# d2f2t2 caught a real layout problem: the projector's input had to be pinned to the batch layout
# (models/projector.py), else the batch shards with data != fsdp got wrong image features
MESHES = {
    "d2f2t2": dict(data=2, fsdp=2, tensor=2),
    "f4t2": dict(data=1, fsdp=4, tensor=2),
    "data8": dict(data=8, fsdp=1, tensor=1),
}
KERNEL = ("llm", "layers_0", "mlp", "up_proj", "kernel")  # ("embed", "mlp"): embed over fsdp, mlp over tensor


def decode_on_meshes() -> dict:
    """Per mesh (and one device): the generated ids and log-probabilities, and where the params went."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mllm_jax import sharding
    from mllm_jax.inference import generate
    from mllm_jax.models.llm import LlmConfig
    from mllm_jax.models.mllm import Llava, LlavaConfig
    from mllm_jax.models.projector import ProjectorConfig
    from mllm_jax.models.vit import VitConfig

    vit = VitConfig(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=16, patch_size=8
    )
    llm = LlmConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
    )
    config = LlavaConfig(vision=vit, projector=ProjectorConfig(16, 32), llm=llm, image_token_id=47)
    model = Llava(config)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 1, 16, 16, 3)).astype(np.float32)
    # 5 prompts of 3-9 text tokens after the image's: 5 rows divide over neither 4 nor 8 shards
    prompts = [
        [1] + [47] * config.tokens_per_image + rng.integers(2, 47, n).tolist() for n in (3, 9, 5, 4, 7)
    ]
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.asarray(images[:1]))
    params = jax.device_get(nn.meta.unbox(params["params"]))
    out = {}
    kwargs = dict(max_new_tokens=6, eos_ids=[])
    for name, spec in {"single": None, **MESHES}.items():
        mesh = None if spec is None else sharding.make_mesh(spec)
        placed = params if mesh is None else generate.place_params(model, params, mesh)
        results = generate.generate(model, placed, prompts, images, mesh=mesh, **kwargs)
        out[name] = {"ids": [r[0] for r in results], "logprobs": [r[1] for r in results]}
        if mesh is not None:
            kernel = placed[KERNEL[0]]
            for key in KERNEL[1:]:
                kernel = kernel[key]
            out[name]["kernel_shard"] = list(kernel.sharding.shard_shape(kernel.shape))
            # params already on the mesh (as training hands them to its eval) are used where they are
            out[name]["kept"] = generate.place_params(model, placed, mesh) is placed
    return out


@jobs.fixture
def sharded_decodes(tmp):
    r = jobs.check(jobs.python(os.path.abspath(__file__), env=xla_env(), timeout=600))
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sharded_generation_equals_one_device(sharded_decodes):
    out = sharded_decodes
    single = out["single"]
    assert len(single["ids"]) == 5 and all(len(ids) == 6 for ids in single["ids"])
    for name in MESHES:
        assert out[name]["ids"] == single["ids"], name
        np.testing.assert_allclose(out[name]["logprobs"], single["logprobs"], atol=1e-4, err_msg=name)
        assert out[name]["kept"], name
    assert out["f4t2"]["kernel_shard"] == [8, 32]  # [32, 64] split over fsdp=4 and tensor=2
    assert out["data8"]["kernel_shard"] == [32, 64]  # data parallel: every device holds it whole


if __name__ == "__main__":
    print(json.dumps(decode_on_meshes()))
