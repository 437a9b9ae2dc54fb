"""`python -m mllm_jax.main` end to end on tiny configs: LLaVA-JSON data, frozen params, resume after
SIGTERM, export, and one-line config errors. The commands run as background jobs (tests/jobs.py)."""

import json
import os
import signal
import subprocess
import time

import jobs
import numpy as np
import pytest
from commands import ROOT, main_cmd, read_metrics
from PIL import Image

from mllm_jax.families import store
from mllm_jax.models import params as param_tree


def run_main(workdir, *flags, check=True, fresh=False):
    r = jobs.run(main_cmd(workdir, *flags), fresh=fresh)
    if check:
        jobs.check(r)
    return r


def write_llava_json(root):
    """A LLaVA-format JSON file with real PNG files (words from the built-in vocabulary):
    ``(json path, image root)``."""
    images = root / "images"
    (images / "coco").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        name = f"coco/{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / name)
        records.append(
            {
                "id": str(i),
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color is the circle ?"},
                    {"from": "gpt", "value": ["red", "blue", "green"][i % 3]},
                    {"from": "human", "value": "how many shapes are there ?"},
                    {"from": "gpt", "value": "two"},
                ],
            }
        )
    path = root / "instruct.json"
    path.write_text(json.dumps(records))
    return str(path), str(images)


ALIGN_END = 2


@jobs.fixture
def llava_json_run(tmp):
    """Both stages through the public command, `instruct` on LLaVA-JSON data, `align` training only
    the projector; then ``python -m mllm_jax.convert`` to HF: ``(workdir, HF dir)``."""
    path, image_root = write_llava_json(tmp)
    workdir, out = str(tmp / "run"), str(tmp / "hf")
    # the training and export commands in their own interpreters (tests/zygote.py)
    run_main(
        workdir,
        f"--config.stages.align.steps={ALIGN_END}",
        "--config.stages.align.trainable=('adapter/.*',)",
        "--config.stages.instruct.steps=3",
        "--config.stages.instruct.data.source=llava_json",
        f"--config.stages.instruct.data.path={path}",
        f"--config.stages.instruct.data.image_root={image_root}",
        "--config.stages.instruct.data.max_length=48",
        fresh=True,
    )
    jobs.check(jobs.python("-m", "mllm_jax.convert", f"--from={workdir}", f"--to_hf={out}", fresh=True))
    return workdir, out


def test_llava_json_trains_through_the_public_command_and_exports(llava_json_run, tmp_path):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm_jax import predict
    from mllm_jax.data.pipeline import heldout_questions
    from mllm_jax.data.synthetic import SyntheticConfig

    workdir, out = llava_json_run
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in train_rows] == ["align"] * 2 + ["instruct"] * 3
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "accuracy"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    evals = [r for r in rows if "eval/vqa_accuracy" in r]
    assert [r["stage"] for r in evals] == ["align", "instruct"]
    assert {"eval/vqa_accuracy_blank", "eval/vqa_accuracy/count", "eval/vqa_accuracy/color"} <= set(evals[-1])
    assert store.latest_step(workdir) == 5
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the exported model answers held-out questions exactly as `predict` does on our checkpoint
    processor = AutoProcessor.from_pretrained(out)
    for item in heldout_questions(SyntheticConfig(), 3):
        image_path = str(tmp_path / "q.png")
        Image.fromarray(item["image"]).save(image_path)
        prompt = f"USER : <image> {item['question']} ASSISTANT :"
        ours = predict.predict(workdir, prompt, [image_path], max_new_tokens=4)
        inputs = processor(images=[Image.open(image_path).convert("RGB")], text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=4)[
                0, inputs["input_ids"].shape[1] :
            ]
        assert ours["token_ids"] == ids.tolist()


def test_stage_trains_only_its_trainable_params(llava_json_run):
    """``align`` of the run above trained only ``adapter/.*`` (its final checkpoint is kept)."""
    workdir, _ = llava_json_run
    trained = param_tree.flatten(store.load_model(workdir, ALIGN_END).params)
    initial = param_tree.flatten(_initial_params(workdir))
    assert trained.keys() == initial.keys()
    for path in trained:
        same = np.array_equal(np.asarray(trained[path]), np.asarray(initial[path]))
        assert same == (not path.startswith("adapter/")), path


def _initial_params(workdir):
    """The run's params at step 0, rebuilt from its saved model config and seed."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mllm_jax import families

    family, config = store.read_model_config(workdir)
    model = families.build(family, config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    images = jnp.zeros((1, 1, config.vision.image_size, config.vision.image_size, 3))
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens, images)["params"])


@pytest.mark.slow  # tests/test_faults.py covers SIGTERM at several points, and more, in CI's default run
def test_sigterm_saves_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path):
    flags = [
        "--config.stages.align.steps=12",
        "--config.stages.instruct.steps=12",
        "--config.checkpoint_every=5",
        "--config.async_checkpoints=False",
    ]
    straight = str(tmp_path / "straight")
    run_main(straight, *flags)
    interrupted = str(tmp_path / "interrupted")
    proc = subprocess.Popen(
        main_cmd(interrupted, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    metrics = os.path.join(interrupted, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # stop it mid-way through stage 1
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    stopped_at = store.latest_step(interrupted)
    assert stopped_at is not None and stopped_at < 24
    run_main(interrupted, *flags)
    a, b = read_metrics(straight), read_metrics(interrupted)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if key.startswith(("loss", "accuracy", "grad_norm", "learning_rate", "eval/")):
                assert abs(value - rb[key]) <= 1e-6, (ra["step"], key, value, rb[key])


CONFIG_MISTAKES = {
    "--config.stages.align.stepz=3": "did you mean config.stages.align.steps?",
    "--config.mesh.data=3": "mesh",
    "--config.stages.align.trainable=('adaptor/.*',)": "match no parameter",
}


@jobs.fixture
def config_mistake_runs(tmp):
    return {flag: run_main(str(tmp / str(i)), flag, check=False) for i, flag in enumerate(CONFIG_MISTAKES)}


@pytest.mark.parametrize(("flag", "message"), CONFIG_MISTAKES.items())
def test_config_mistakes_fail_with_one_line_and_exit_2(flag, message, config_mistake_runs):
    r = config_mistake_runs[flag]
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr


def test_train_steps_compile_once(tmp_path):
    """After the first step nothing recompiles: shapes, dtypes and shardings are stable."""
    import sharded_step

    from mllm_jax.training import runconfig, train

    c = sharded_step.llava()
    run = runconfig.from_config_dict(c)
    trainer = train.Trainer(run, str(tmp_path / "compile"))
    params, _ = trainer._initial_params(None)
    stage = run.stages[1]
    state, tx, lr = trainer.stage_state(stage, params)
    import jax

    iterator = trainer.setup.data_iterator(stage, seed=0)
    for i in range(3):
        state, _ = trainer.step(stage, tx, lr, state, next(iterator), jax.random.key(i))
    assert trainer._step_fns["fn"]._cache_size() == 1


@jobs.fixture
def bench_run(tmp):
    flags = ["--size=tiny", "--batch=2", "--seq=48", "--steps=1", "--decode_tokens=2", "--decode_batch=1"]
    return jobs.python("-m", "mllm_jax.bench", *flags, fresh=True)  # in its own interpreter


def test_bench_prints_the_figures(bench_run):
    r = bench_run
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["model_flops_per_step"] > 0 and result["peak_flops"] > 0
    assert result["jax"]["step_time_s"] > 0 and 0 < result["jax"]["mfu"] < 1
    assert result["jax"]["decode_tokens_per_sec"] > 0
