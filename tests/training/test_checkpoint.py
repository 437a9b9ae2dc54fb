"""Checkpoint integrity: a step killed while being written is never the newest, and restoring into a
model it does not fit names the first mismatching path and both shapes."""

import os
import signal
import textwrap

import jax
import jax.numpy as jnp
import jobs
import numpy as np
import optax
import pytest

from mllm_jax import errors
from mllm_jax.families import store
from mllm_jax.training import checkpoint


def _params(width=8):
    return {
        "adapter": {"linear_1": {"bias": jnp.arange(3.0)}},
        "llm": {"layers_0": {"mlp": {"gate": {"kernel": jnp.ones((4, width))}}}},
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# Saves step 1, then starts step 2 and is SIGKILLed by orbax's own finalize, i.e. with every array
# of step 2 on disk but the step not yet committed: the most complete a half-written step can be.
KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from mllm_jax.training import checkpoint

    ckpt = checkpoint.TrainCheckpointer(sys.argv[1], keep=3, async_save=True)
    params = {"w": jnp.ones((4, 8))}
    ckpt.save(1, params, {"stage": "align", "stage_step": 1}, wait=True)

    async def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, {"w": 2 * params["w"]}, {"stage": "align", "stage_step": 2}, wait=True)
    """
)


def test_a_step_killed_while_being_written_is_never_the_newest(tmp_path):
    workdir = str(tmp_path / "run")
    r = jobs.python("-c", KILLED_MID_SAVE, workdir)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    entries = os.listdir(os.path.join(workdir, store.CHECKPOINTS))
    assert "1" in entries and any(e.startswith("2.orbax-checkpoint-tmp") for e in entries), entries

    assert store.latest_step(workdir) == 1
    ckpt = checkpoint.TrainCheckpointer(workdir, keep=3, async_save=False)
    assert ckpt.latest_step() == 1
    restored = ckpt.restore(1, "params", {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], np.ones((4, 8)))
    assert ckpt.restore(1, "meta") == {"stage": "align", "stage_step": 1}
    # the resumed run writes step 2 again, this time to the end
    ckpt.save(2, {"w": 3 * jnp.ones((4, 8))}, {"stage": "align", "stage_step": 2}, wait=True)
    assert ckpt.latest_step() == 2
    ckpt.close()
    assert sorted(os.listdir(os.path.join(workdir, store.CHECKPOINTS))) == ["1", "2"]


def test_the_trainer_clears_leftover_unfinished_steps(tmp_path):
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path), keep=2, async_save=False)
    ckpt.save(3, {"w": jnp.ones(2)}, {"stage": "align"}, wait=True)
    ckpt.close()
    leftover = tmp_path / store.CHECKPOINTS / "9.orbax-checkpoint-tmp"
    (leftover / "params").mkdir(parents=True)  # the layout a killed writer leaves
    assert store.latest_step(str(tmp_path)) == 3
    assert leftover.exists()  # reading never deletes anything
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path), keep=2, async_save=False)
    assert ckpt.latest_step() == 3
    ckpt.save(4, {"w": jnp.ones(2)}, {"stage": "align"}, wait=True)  # orbax finishes the cleanup first
    ckpt.close()
    assert not leftover.exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint with params and the Adam state of those params (namedtuples in the tree)."""
    directory = str(tmp_path_factory.mktemp("saved"))
    params = _params()
    opt_state = optax.adam(1e-3).init(params)
    ckpt = checkpoint.TrainCheckpointer(directory, async_save=False)
    ckpt.save(500, params, {"stage": "instruct"}, opt_state=opt_state, data_state={"index": 7}, wait=True)
    ckpt.close()
    return directory, params, opt_state


def test_a_matching_target_restores(saved):
    directory, params, opt_state = saved
    ckpt = checkpoint.TrainCheckpointer(directory, async_save=False)
    got = ckpt.restore(500, "params", _abstract(params))
    jax.tree.map(np.testing.assert_array_equal, got, params)
    got_opt = ckpt.restore(500, "opt_state", _abstract(opt_state))
    assert jax.tree.structure(got_opt) == jax.tree.structure(opt_state)
    assert ckpt.restore(500, "data") == {"index": 7}
    ckpt.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: _params(width=16),
            "checkpoint step 500 does not match the model: llm/layers_0/mlp/gate/kernel has shape (4, 8) "
            "in the checkpoint, (4, 16) in the config",
        ),
        (
            lambda p: {**p, "vision": {"scale": jnp.ones(2)}},
            "checkpoint step 500 does not match the model: vision/scale is in the config but not in the "
            "checkpoint",
        ),
        (
            lambda p: {"llm": p["llm"]},
            "checkpoint step 500 does not match the model: adapter/linear_1/bias is in the checkpoint but "
            "not in the config",
        ),
    ],
    ids=["shape", "missing", "extra"],
)
def test_a_mismatching_model_gets_one_line_naming_the_path_and_shapes(saved, change, message):
    directory, params, _ = saved
    ckpt = checkpoint.TrainCheckpointer(directory, async_save=False)
    with pytest.raises(errors.CheckpointMismatch) as e:
        ckpt.restore(500, "params", _abstract(change(params)))
    ckpt.close()
    assert str(e.value) == message


def test_optimizer_state_of_other_trainable_params_is_a_mismatch(saved):
    directory, params, _ = saved
    other = optax.adam(1e-3).init({"llm": params["llm"]})  # the stage now trains only llm/*
    ckpt = checkpoint.TrainCheckpointer(directory, async_save=False)
    with pytest.raises(errors.CheckpointMismatch, match=r"opt_state 0/mu/adapter/linear_1/bias is in the"):
        ckpt.restore(500, "opt_state", _abstract(other))
    with pytest.raises(errors.CheckpointMismatch, match="checkpoint step 400 has no 'params'"):
        ckpt.restore(400, "params", _abstract(params))
    ckpt.close()


def test_readers_create_nothing(tmp_path):
    from mllm_jax.models.mllm import LlavaConfig

    store.write_model_config(str(tmp_path), "llava", LlavaConfig())
    assert store.latest_step(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        store.load_model(str(tmp_path))
    assert os.listdir(tmp_path) == [store.MODEL_CONFIG]
