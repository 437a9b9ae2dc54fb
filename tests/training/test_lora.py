"""LoRA as a stage option: the merge math, what a LoRA stage trains, and one shrunken ``tiny_lora`` run
through the public command (export, predict, resume from the middle of the LoRA stage, config errors).
The commands run as background jobs (tests/jobs.py)."""

import os
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import jobs
import numpy as np
import pytest
from commands import SMALL, read_metrics
from PIL import Image

from mllm_jax import errors
from mllm_jax.families import store
from mllm_jax.models import params as param_tree
from mllm_jax.training import checkpoint, lora, runconfig

# ---------------------------------------------------------------- merge math


def _params():
    """A 2-D target, a scan-stacked [L, in, out] target, and params LoRA must leave alone."""
    rng = np.random.default_rng(0)
    return {
        "llm": {
            "layers_0": {"self_attn": {"q_proj": {"kernel": rng.normal(size=(8, 6)).astype(np.float32)}}},
            "layers": {"mlp": {"up_proj": {"kernel": rng.normal(size=(3, 8, 10)).astype(np.float32)}}},
            "norm": {"scale": np.ones(8, np.float32)},
            "lm_head": {"kernel": rng.normal(size=(8, 5)).astype(np.float32)},
        },
        "adapter": {"linear_1": {"kernel": rng.normal(size=(4, 8)).astype(np.float32)}},
    }


CONFIG = lora.LoraConfig(rank=4, alpha=8.0)


def test_init_factors_shapes_and_zero_b_merge_to_exactly_the_base():
    params = _params()
    factors = param_tree.flatten(lora.init_factors(jax.random.key(0), params, CONFIG))
    assert sorted(factors) == [
        "llm/layers/mlp/up_proj/kernel/a",
        "llm/layers/mlp/up_proj/kernel/b",
        "llm/layers_0/self_attn/q_proj/kernel/a",
        "llm/layers_0/self_attn/q_proj/kernel/b",
    ]
    chex.assert_shape(factors["llm/layers_0/self_attn/q_proj/kernel/a"], (8, 4))
    chex.assert_shape(factors["llm/layers_0/self_attn/q_proj/kernel/b"], (4, 6))
    chex.assert_shape(factors["llm/layers/mlp/up_proj/kernel/a"], (3, 8, 4))  # one pair per layer
    chex.assert_shape(factors["llm/layers/mlp/up_proj/kernel/b"], (3, 4, 10))
    assert np.abs(np.asarray(factors["llm/layers/mlp/up_proj/kernel/a"])).max() > 0
    merged = param_tree.merge_lora(params, param_tree.unflatten(factors), CONFIG.scale)
    chex.assert_trees_all_equal(merged, params)  # B = 0: the stage starts at its base, bit for bit


def test_merge_is_base_plus_alpha_over_rank_a_times_b():
    params = _params()
    rng = np.random.default_rng(1)
    factors = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32),
        lora.init_factors(jax.random.key(0), params, CONFIG),
    )
    merged = param_tree.flatten(param_tree.merge_lora(params, factors, 2.0))
    flat_f, flat_p = param_tree.flatten(factors), param_tree.flatten(params)
    q = "llm/layers_0/self_attn/q_proj/kernel"
    np.testing.assert_allclose(
        merged[q], flat_p[q] + 2.0 * flat_f[q + "/a"] @ flat_f[q + "/b"], rtol=1e-5, atol=1e-5
    )
    up = "llm/layers/mlp/up_proj/kernel"
    for layer in range(3):
        want = flat_p[up][layer] + 2.0 * flat_f[up + "/a"][layer] @ flat_f[up + "/b"][layer]
        np.testing.assert_allclose(merged[up][layer], want, rtol=1e-5, atol=1e-5)
    for path in ("llm/norm/scale", "llm/lm_head/kernel", "adapter/linear_1/kernel"):
        np.testing.assert_array_equal(merged[path], flat_p[path])
    # the merge keeps each param's dtype
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = param_tree.merge_lora(bf16, jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), factors), 2.0)
    chex.assert_trees_all_equal_dtypes(out, bf16)


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("lora_dict", "message"),
    [
        (dict(rank=-1), "config.stages.instruct.lora.rank must be a non-negative integer"),
        (dict(rank=4, alpha=0.0), "config.stages.instruct.lora.alpha must be > 0"),
        (dict(rank=4, targets=("llm/(",)), "config.stages.instruct.lora.targets: 'llm/(' is not a regex"),
        (dict(rank=4, ranks=2), "unknown config key stages.instruct.lora.'ranks'"),
    ],
)
def test_bad_lora_values_are_one_line_config_errors(lora_dict, message):
    import sharded_step

    c = sharded_step.llava()
    c.stages.instruct.lora = lora_dict
    with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(")):
        runconfig.from_config_dict(c)


def test_targets_must_select_frozen_kernels():
    shapes = {p: np.shape(v) for p, v in param_tree.flatten(_params()).items()}
    check = lambda targets, trainable=("adapter/.*",): lora.check_stage(  # noqa: E731
        "instruct", shapes, lora.LoraConfig(rank=2, targets=targets), trainable
    )
    check(lora.DEFAULT_TARGETS)  # q_proj and the stacked up_proj
    with pytest.raises(errors.ConfigError, match="lora.targets.*match no kernel"):
        check(("vision/.*/kernel",))
    with pytest.raises(errors.ConfigError, match="llm/norm/scale of shape"):
        check(("llm/norm/.*",))
    with pytest.raises(
        errors.ConfigError,
        match="and config.stages.instruct.trainable both select llm/layers/mlp/up_proj/kernel",
    ):
        check(lora.DEFAULT_TARGETS, ("adapter/.*", "llm/.*"))


# ---------------------------------------------------------------- a LoRA stage in the Trainer


def test_lora_stage_trains_only_factors_and_trainable_and_compiles_once(tmp_path):
    import sharded_step

    from mllm_jax.training import train

    c = sharded_step.llava()
    c.stages.instruct.trainable = ("adapter/.*",)
    c.stages.instruct.lora.rank = 4
    c.stages.instruct.batch_size = 4
    run = runconfig.from_config_dict(c)
    trainer = train.Trainer(run, str(tmp_path / "lora"))
    params, shardings = trainer._initial_params(None)
    initial = jax.tree.map(np.asarray, params)
    stage = run.stages[1]
    state, tx, lr = trainer.stage_state(stage, params)
    # Adam moments exist for the factors and the adapter only
    mu = param_tree.flatten(state["opt_state"][1][0].mu)
    assert mu and all(p.startswith(("lora/llm/", "adapter/")) for p in mu), sorted(mu)
    assert {p.rsplit("/", 1)[0] for p in mu if p.startswith("lora/")} == {
        f"lora/llm/layers_0/{m}/kernel"
        for m in (
            "self_attn/q_proj",
            "self_attn/k_proj",
            "self_attn/v_proj",
            "self_attn/o_proj",
            "mlp/gate_proj",
            "mlp/up_proj",
            "mlp/down_proj",
        )
    }
    # A is split like its kernel's input dim, B like its output dim
    kernel = shardings["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec
    q = state["trainable"]["lora"]["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q["a"].sharding.spec) == (kernel[0], None)
    assert tuple(q["b"].sharding.spec) == (None, kernel[1])
    iterator = trainer.setup.data_iterator(stage, seed=0)
    for i in range(3):
        state, metrics = trainer.step(stage, tx, lr, state, next(iterator), jax.random.key(i))
    assert trainer._step_fns["fn"]._cache_size() == 1
    assert float(metrics["grad_norm"]) > 0
    # the base stays bit-identical; the factors and the adapter moved
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state["frozen"]["llm"]), initial["llm"])
    q = state["trainable"]["lora"]["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # the step donates
    assert np.abs(np.asarray(q["b"])).max() > 0
    assert not np.array_equal(
        np.asarray(state["trainable"]["adapter"]["linear_1"]["kernel"]),
        initial["adapter"]["linear_1"]["kernel"],
    )
    # merging changes exactly the targets
    merged = param_tree.flatten(jax.tree.map(np.asarray, trainer._params_of(stage, state, shardings)))
    flat_initial = param_tree.flatten(initial)
    assert merged.keys() == flat_initial.keys()
    for path, value in merged.items():
        if path.startswith("llm/"):
            changed = not np.array_equal(value, flat_initial[path])
            assert changed == bool(lora.target_paths({path: value.shape}, stage.lora)), path


# ---------------------------------------------------------------- through the public command

ALIGN, INSTRUCT = 2, 6  # global steps 1-2 align, 3-8 instruct; mid-stage checkpoint at 5
FLAGS = [
    *SMALL,
    f"--config.stages.align.steps={ALIGN}",
    f"--config.stages.instruct.steps={INSTRUCT}",
    "--config.checkpoint_every=3",
    "--config.keep_checkpoints=10",
    "--config.async_checkpoints=False",
]
MID, END = ALIGN + 3, ALIGN + INSTRUCT


def lora_cmd(workdir, *flags):
    return [
        sys.executable,
        "-m",
        "mllm_jax.main",
        "--config=configs/llava.py:tiny_lora",
        f"--workdir={workdir}",
        *FLAGS,
        *flags,
    ]


@jobs.fixture
def lora_run(tmp):
    workdir = str(tmp / "run")
    jobs.check(jobs.run(lora_cmd(workdir)))
    return workdir


def _raw(workdir, step, item="params"):
    ckpt = checkpoint.TrainCheckpointer(workdir, None, async_save=False)
    try:
        return param_tree.flatten(jax.tree.map(np.asarray, ckpt.restore(step, item)))
    finally:
        ckpt.close()


def test_lora_run_freezes_the_base_and_checkpoints_what_it_needs(lora_run):
    assert sorted(int(s) for s in os.listdir(os.path.join(lora_run, "checkpoints"))) == [ALIGN, MID, END]
    align, mid, end = (_raw(lora_run, s) for s in (ALIGN, MID, END))
    factors = _raw(lora_run, MID, "lora")
    targets = {p.rsplit("/", 1)[0] for p in factors}
    # mid-stage: the params item is the base, untouched; the factors and rank/alpha ride along
    for path, value in align.items():
        if path.startswith(("llm/", "vision/")):
            np.testing.assert_array_equal(mid[path], value, err_msg=path)
    assert _raw_meta(lora_run, MID)["lora"] == {"rank": 16, "alpha": 32.0}
    # readers (predict, convert, evaluate) get the merged model of a mid-stage step
    loaded = param_tree.flatten(store.load_model(lora_run, MID).params)
    for path in targets:
        want = param_tree.merge_kernel(mid[path], factors[path + "/a"], factors[path + "/b"], 32.0 / 16)
        np.testing.assert_allclose(loaded[path], want, rtol=1e-6, atol=1e-6)
        assert not np.array_equal(loaded[path], mid[path])
    # the stage's final checkpoint is plain params: targets merged, the tower frozen, no factors left
    assert not os.path.exists(os.path.join(lora_run, "checkpoints", str(END), "lora"))
    assert end.keys() == align.keys()
    for path, value in align.items():
        if path.startswith("vision/") or (path.startswith("llm/") and path not in targets):
            np.testing.assert_array_equal(end[path], value, err_msg=path)
        elif path in targets:
            assert not np.array_equal(end[path], value), path


def _raw_meta(workdir, step):
    ckpt = checkpoint.TrainCheckpointer(workdir, None, async_save=False)
    try:
        return ckpt.restore(step, "meta")
    finally:
        ckpt.close()


@jobs.fixture
def lora_export(tmp):
    out = str(tmp / "hf")
    jobs.check(jobs.python("-m", "mllm_jax.convert", f"--from={jobs.result('lora_run')}", f"--to_hf={out}"))
    return out


def test_lora_export_is_a_plain_hf_model_that_answers_like_predict(lora_run, lora_export, tmp_path):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm_jax import predict
    from mllm_jax.data.pipeline import heldout_questions
    from mllm_jax.data.synthetic import SyntheticConfig

    out = lora_export
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k for k in model.state_dict())
    processor = AutoProcessor.from_pretrained(out)
    for item in heldout_questions(SyntheticConfig(), 3):
        image_path = str(tmp_path / "q.png")
        Image.fromarray(item["image"]).save(image_path)
        prompt = f"USER : <image> {item['question']} ASSISTANT :"
        ours = predict.predict(lora_run, prompt, [image_path], max_new_tokens=4)
        inputs = processor(images=[Image.open(image_path).convert("RGB")], text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=4)[
                0, inputs["input_ids"].shape[1] :
            ]
        assert ours["token_ids"] == ids.tolist()


@jobs.fixture
def lora_resumed(tmp):
    """As if the run had died right after the mid-stage checkpoint (only the newest step is lost), the
    same command again: ``(workdir, the rerun)``."""
    workdir = str(tmp / "resumed")
    shutil.copytree(jobs.result("lora_run"), workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(END)))
    return workdir, jobs.run(lora_cmd(workdir))


def test_resume_inside_the_lora_stage_ends_like_the_uninterrupted_run(lora_run, lora_resumed):
    workdir, r = lora_resumed
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {MID}" in r.stderr
    want, got = read_metrics(lora_run), read_metrics(workdir)
    assert [(x["step"], x["stage"]) for x in got] == [(x["step"], x["stage"]) for x in want]
    for a, b in zip(want, got, strict=True):
        for key, value in a.items():
            if key.startswith(("loss", "accuracy", "grad_norm", "learning_rate", "eval/")):
                assert abs(value - b[key]) <= 1e-6, (a["step"], key, value, b[key])
    chex.assert_trees_all_equal(_raw(workdir, END), _raw(lora_run, END))


@jobs.fixture
def lora_bad_targets(tmp):
    workdir = str(tmp / "bad")
    return workdir, jobs.run(
        lora_cmd(workdir, "--config.stages.instruct.lora.targets=('llm/.*/qkv/kernel',)")
    )


def test_lora_targets_that_match_nothing_fail_in_one_line_with_exit_2(lora_bad_targets):
    workdir, r = lora_bad_targets
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert errors[0].startswith("error: config.stages.instruct.lora.targets ['llm/.*/qkv/kernel'] match no")
    assert not os.path.exists(workdir)
