"""`python -m mllm_jax.main --config=configs/llama_adapter.py:tiny` shrunk: one stage from nothing;
`convert --to_hf` writes the LlamaForCausalLM directory plus the adapter, and `predict` and
`evaluate` answer the same from our checkpoint and from that directory. Whether the tiny preset learns
its task is measured in docs/llama_adapter.md (minutes on 2 cores)."""

import os

import jobs
import numpy as np
from commands import read_metrics
from PIL import Image

from mllm_jax import predict
from mllm_jax.data.fewshot import heldout_questions
from mllm_jax.data.synthetic import SyntheticConfig
from mllm_jax.evaluation import run
from mllm_jax.families import store
from mllm_jax.hf import llama_adapter as hf_adapter
from mllm_jax.training import presets

FLAGS = [
    "--config.model.vision.num_layers=1",
    "--config.model.vision.hidden_size=32",
    "--config.model.vision.intermediate_size=64",
    "--config.model.llm.num_layers=2",
    "--config.model.llm.hidden_size=32",
    "--config.model.llm.intermediate_size=64",
    "--config.model.llm.head_dim=8",
    "--config.model.adapter_len=4",
    "--config.model.adapter_layers=1",
    "--config.model.gate_init=0.0",  # LLaMA-Adapter's zero gates: training must open them
    "--config.stages.instruct.steps=3",
    "--config.stages.instruct.batch_size=4",
    "--config.stages.instruct.learning_rate=0.05",  # the gates leave zero in three steps
    "--config.stages.instruct.warmup_steps=0",
    "--config.log_every=1",
    "--config.eval.num_questions=0",  # evaluate runs below, on the checkpoint and on its export
    "--config.tensorboard=False",
]


@jobs.fixture
def adapter_run(tmp):
    workdir, out = str(tmp / "run"), str(tmp / "hf")
    config = "configs/llama_adapter.py:tiny"
    jobs.check(jobs.python("-m", "mllm_jax.main", f"--config={config}", f"--workdir={workdir}", *FLAGS))
    jobs.check(jobs.python("-m", "mllm_jax.convert", f"--from={workdir}", f"--to_hf={out}"))
    return workdir, read_metrics(workdir), out


def test_tiny_is_one_stage_from_nothing():
    c = presets.load("configs/llama_adapter.py:tiny")
    assert tuple(c.stage_order) == ("instruct",) and c.model.family == "llama_adapter"
    assert not any(c.model.init.to_dict().values()) and c.stages.instruct.data.source == "synthetic"
    real = presets.load("configs/llama_adapter.py:7b")
    assert tuple(real.stages.instruct.trainable) == (r"adapter/.*",)  # adapter-only


def test_trains_evaluates_and_the_export_answers_as_our_checkpoint(adapter_run, tmp_path):
    workdir, rows, out = adapter_run
    train_rows = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in train_rows] == ["instruct"] * 3
    assert all(np.isfinite(r["loss"]) and r["train/skipped_steps"] == 0 for r in train_rows)

    ours = store.load_model(workdir)
    assert np.any(np.asarray(ours.params["adapter"]["gates"]) != 0)  # trained: the image is read
    exported = store.load_pretrained(out)
    assert exported.family == "llama_adapter" and exported.config == ours.config
    assert {hf_adapter.CONFIG_FILE, hf_adapter.WEIGHTS_FILE, "model.safetensors"} <= set(os.listdir(out))

    items = heldout_questions(SyntheticConfig(), 1)
    for i, item in enumerate(items):
        path = str(tmp_path / f"q{i}.png")
        Image.fromarray(item["image"]).save(path)
        prompt = f"USER : <image> {item['question']} ASSISTANT :"
        a = predict.predict(workdir, prompt, [path], max_new_tokens=3)
        b = predict.predict(out, prompt, [path], max_new_tokens=3)
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)

    results = [run.evaluate(model, "synthetic_vqa", limit=6, batch_size=3) for model in (workdir, out)]
    assert results[0]["num_examples"] == results[1]["num_examples"] == 6
    assert 0 <= results[0]["eval/vqa_accuracy"] <= 1 and "eval/vqa_accuracy_blank" in results[0]
    assert {k: v for k, v in results[0].items() if k != "model"} == {
        k: v for k, v in results[1].items() if k != "model"
    }
