"""One train step of each family (LLaVA; Flamingo with and without its perceiver resampler; BLIP-2's
stage 1 and stage 2) sharded over 8 simulated CPU devices equals the single-device step, and the params
and their Adam moments really are split across the devices. The steps run in one subprocess
(tests/sharded_step.py: the device count is fixed when JAX starts), a background job (tests/jobs.py)."""

import json
import math
import os

import jobs
import numpy as np
import pytest
from sharded_step import CASES as STEP_CASES

from mllm_jax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = tuple(STEP_CASES)
# (case, mesh) for each sharded mesh a case runs under: each family under d2f2t2 and fsdp8
SHARDED = [(case, mesh) for case, (_, _, meshes) in STEP_CASES.items() for mesh in meshes]
ATOL = 1e-5
# Adam's first moment is 0.1 x the clipped gradient. Many gradient entries are far below ATOL (the vision
# tower behind Flamingo's gates, the Q-Former's attention at init), so each gradient is also compared
# relative to its own size; float32 rounding alone gives up to ~5e-3 there (ITC's projections, under pure
# data parallelism too) and exactly-zero gradients (key biases) come out as ~1e-13 rounding noise.
GRAD_RTOL, GRAD_FLOOR = 2e-2, 1e-9

# case -> param -> (shape, shard shape under data=2,fsdp=2,tensor=2, under fsdp=8). Kernels are
# ("embed", "mlp"|"heads") or the reverse: embed over fsdp, mlp/heads over tensor.
SPLIT = {
    "llava": {"llm/layers_0/mlp/up_proj/kernel": ([32, 64], [16, 32], [4, 64])},
    "flamingo": {
        "adapter/xattn_0/mlp/up_proj/kernel": ([32, 64], [16, 32], [4, 64]),
        "vision/layers_0/mlp/fc1/kernel": ([32, 64], [16, 32], [4, 64]),
    },
    "flamingo_resampler": {
        "adapter/perceiver/blocks_0/mlp/fc/kernel": ([32, 64], [16, 32], [4, 64]),
        "adapter/perceiver/latents": ([4, 32], [4, 16], [4, 4]),  # (None, "embed")
    },
    "blip2_qformer": {
        "adapter/qformer/layer_0/crossattention/value/kernel": ([32, 32], [16, 16], [4, 32]),
        "vision/layers_0/self_attn/qkv/kernel": ([32, 96], [16, 48], [4, 96]),
    },
    "blip2_generate": {
        "llm/layers_0/fc1/kernel": ([32, 64], [16, 32], [4, 64]),
        "adapter/language_projection/kernel": ([32, 32], [16, 16], [32, 4]),  # ("mlp", "embed")
    },
}


@jobs.fixture
def steps(tmp):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = jobs.check(jobs.python(os.path.join(HERE, "sharded_step.py"), str(tmp), env=env))
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {(row["case"], row["mesh"]): row for row in rows}, tmp


def load(out, case, mesh):
    with np.load(out / f"{case}-{mesh}.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize(("case", "mesh"), SHARDED)
def test_sharded_step_equals_single_device(steps, case, mesh):
    rows, out = steps
    single, sharded = rows[case, "single"]["metrics"], rows[case, mesh]["metrics"]
    assert sharded.keys() == single.keys()
    assert single["skipped"] == 0 and single["target_tokens"] > 0
    if case == "blip2_qformer":  # stage 1: ITC over the global batch, ITM, ITG
        assert {"loss/itc", "loss/itm", "loss/itg"} <= single.keys()
    for key in single:  # loss (and its parts), grad norm, accuracy, ...
        assert abs(sharded[key] - single[key]) < ATOL, (key, sharded[key], single[key])
    ref, got = load(out, case, "single"), load(out, case, mesh)
    assert got.keys() == ref.keys()
    for key in ref:  # every param after the step, and Adam's first moments (the gradients)
        assert got[key].shape == ref[key].shape, key
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=ATOL, err_msg=key)
        if key.startswith("mu/"):
            error, scale = np.abs(got[key] - ref[key]).max(), np.abs(ref[key]).max()
            assert error <= GRAD_RTOL * scale + GRAD_FLOOR, (key, error, scale)


@pytest.mark.parametrize("case", CASES)
def test_step_trains_what_it_should(steps, case):
    """The step really updated the trainable params (so that comparing them means something), the
    params checked for splitting among them, and left the frozen ones alone."""
    rows, out = steps
    init, after = load(out, case, "init"), load(out, case, "single")
    trainable = rows[case, "single"]["shards"].keys()
    assert set(SPLIT[case]) <= trainable
    change = {key: float(np.abs(after[key] - value).max()) for key, value in init.items()}
    assert max(change[key] for key in trainable) > 1e-3
    for key in init:
        if key not in trainable:
            assert change[key] == 0, key
        elif key in SPLIT[case]:
            # two orders of magnitude above the floor the gradient comparison allows: a real gradient
            assert change[key] > 0 and np.abs(after[f"mu/{key}"]).max() > 1e2 * GRAD_FLOOR, key


@pytest.mark.parametrize("case", CASES)
def test_params_and_moments_are_really_split(steps, case):
    rows, _ = steps
    single = rows[case, "single"]["shards"]
    for path, (shape, d2f2t2, fsdp8) in SPLIT[case].items():
        assert single[path] == [shape, 1, [shape], [shape], [shape]]
        for mesh, expected in (("d2f2t2", d2f2t2), ("fsdp8", fsdp8)):
            if mesh in STEP_CASES[case][2]:
                assert rows[case, mesh]["shards"][path] == [shape, 8, [expected], [expected], [expected]], (
                    mesh
                )
    for mesh, pieces in (("d2f2t2", 2), ("fsdp8", 8)):
        if mesh not in STEP_CASES[case][2]:
            continue
        for path, (shape, devices, shards, mu, nu) in rows[case, mesh]["shards"].items():
            assert devices == 8 and mu == shards and nu == shards, (mesh, path)  # moments like params
            if path.endswith("kernel"):  # every kernel is split: fsdp=8 over its embed dimension
                (shard,) = shards
                assert math.prod(shape) >= pieces * math.prod(shard), (mesh, path, shape, shard)
                assert mesh != "fsdp8" or math.prod(shape) == 8 * math.prod(shard), (path, shape, shard)


def test_mesh_shapes_resolve_and_reject():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="3 devices, but 8"):
        sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
