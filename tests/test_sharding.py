"""A LLaVA train step sharded over 8 simulated CPU devices equals the single-device step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mllm_jax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def steps():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_step.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(HERE),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {row["mesh"]: row for row in rows}


@pytest.mark.parametrize("mesh", ["d2f2t2", "fsdp8"])
def test_sharded_step_equals_single_device(steps, mesh):
    single, sharded = steps["single"], steps[mesh]
    assert abs(single["loss"] - sharded["loss"]) < 1e-5
    assert single["params"].keys() == sharded["params"].keys()
    for key in single["params"]:
        np.testing.assert_allclose(sharded["params"][key], single["params"][key], atol=1e-5, err_msg=key)
        np.testing.assert_allclose(
            sharded["param_sums"][key], single["param_sums"][key], atol=1e-4, err_msg=key
        )


def test_params_are_really_split(steps):
    assert steps["single"]["up_proj_shards"] == [[32, 64]]
    # up_proj kernel is ("embed", "mlp"): embed over fsdp, mlp over tensor
    assert steps["d2f2t2"]["devices"] == 8 and steps["d2f2t2"]["up_proj_shards"] == [[16, 32]]
    assert steps["fsdp8"]["devices"] == 8 and steps["fsdp8"]["up_proj_shards"] == [[4, 64]]
    for mesh in ("d2f2t2", "fsdp8"):  # Adam moments are split like their params
        assert steps[mesh]["moment_shards"] == steps[mesh]["up_proj_shards"]


def test_mesh_shapes_resolve_and_reject():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="3 devices, but 8"):
        sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
