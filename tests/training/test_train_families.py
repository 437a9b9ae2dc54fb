"""`python -m mllm_jax.main` for the Flamingo (IDEFICS) and BLIP-2 families on shrunken tiny configs:
both stages run, the family's metrics are logged, and the exported HF checkpoint loads cleanly in
transformers and answers held-out prompts exactly as our `predict` does. Each run and its export is a
background job (tests/jobs.py)."""

import jobs
import numpy as np
import pytest
import torch
from commands import read_metrics
from PIL import Image

from mllm_jax import predict
from mllm_jax.data.fewshot import heldout_questions, support_questions
from mllm_jax.data.synthetic import SyntheticConfig
from mllm_jax.families import store

COMMON = [
    "--config.log_every=1",
    "--config.eval.batch_size=8",
    "--config.tensorboard=False",
    "--config.model.llm.num_layers=2",
    "--config.model.llm.hidden_size=32",
    "--config.model.llm.intermediate_size=64",
]


def train_and_export(tmp, config, *flags):
    """Train through ``python -m mllm_jax.main``, then export with ``python -m mllm_jax.convert``:
    ``(workdir, metrics rows, HF dir)``."""
    workdir, out = str(tmp / "run"), str(tmp / "hf")
    cmd = ["-m", "mllm_jax.main", f"--config={config}", f"--workdir={workdir}", *COMMON, *flags]
    jobs.check(jobs.python(*cmd))
    jobs.check(jobs.python("-m", "mllm_jax.convert", f"--from={workdir}", f"--to_hf={out}"))
    return workdir, read_metrics(workdir), out


def save(image, path):
    Image.fromarray(image).save(path)
    return path


def hf_new_ids(model, inputs, n):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, max_new_tokens=n)[0, inputs["input_ids"].shape[1] :]


@jobs.fixture
def flamingo_run(tmp):
    return train_and_export(
        tmp,
        "configs/flamingo.py:tiny",
        "--config.stages.align.steps=2",
        "--config.stages.instruct.steps=3",
        "--config.stages.align.batch_size=4",
        "--config.stages.instruct.batch_size=4",
        "--config.model.llm.head_dim=8",
        "--config.model.xattn.head_dim=8",
        "--config.model.xattn.intermediate_size=64",
        "--config.eval.num_questions=8",
        "--config.eval.shots=(0, 4)",
    )


def test_flamingo_trains_evaluates_few_shot_and_exports(flamingo_run, tmp_path):
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    workdir, rows, out = flamingo_run
    train_rows = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in train_rows] == ["align"] * 2 + ["instruct"] * 3
    assert all(np.isfinite(r["loss"]) and r["train/skipped_steps"] == 0 for r in train_rows)
    [ev] = [r for r in rows if "eval/vqa_accuracy" in r]  # eval.stages: after instruct only
    assert {"eval/vqa_accuracy_blank", "eval/vqa_accuracy_0shot", "eval/vqa_accuracy_4shot"} <= set(ev)
    assert store.latest_step(workdir) == 5

    model, info = IdeficsForVisionText2Text.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    processor = AutoProcessor.from_pretrained(out)
    config = SyntheticConfig()
    [support] = support_questions(config, 1)
    for i, item in enumerate(heldout_questions(config, 1)):
        # a one-shot prompt: two images, each followed by its own question
        paths = [
            save(support["image"], str(tmp_path / f"s{i}.png")),
            save(item["image"], str(tmp_path / f"q{i}.png")),
        ]
        prompt = f"USER : <image> {support['question']} ASSISTANT : {support['answer']} </s> "
        prompt += f"USER : <image> {item['question']} ASSISTANT :"
        ours = predict.predict(workdir, prompt, paths, max_new_tokens=3)
        images = [Image.open(p).convert("RGB") for p in paths]
        pieces = prompt.split("<image>")
        interleaved = [pieces[0].strip(), images[0], pieces[1].strip(), images[1], pieces[2].strip()]
        inputs = processor(text=[interleaved], return_tensors="pt")
        assert hf_new_ids(model, inputs, 3).tolist()[: len(ours["token_ids"])] == ours["token_ids"]


@jobs.fixture
def blip2_run(tmp):
    return train_and_export(
        tmp,
        "configs/blip2.py:tiny",
        "--config.stages.qformer.steps=2",
        "--config.stages.generate.steps=3",
        "--config.stages.qformer.batch_size=4",
        "--config.stages.generate.batch_size=4",
        "--config.model.qformer.num_layers=1",
        "--config.eval.num_questions=8",
        "--config.eval.num_retrieval=8",
    )


def test_blip2_trains_both_stages_and_exports(blip2_run, tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    workdir, rows, out = blip2_run
    train_rows = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in train_rows] == ["qformer"] * 2 + ["generate"] * 3
    assert all({"loss/itc", "loss/itm", "loss/itg"} <= set(r) for r in train_rows[:2])
    evals = {r["stage"]: r for r in rows if any(k.startswith("eval/") for k in r)}
    assert 0 <= evals["qformer"]["eval/retrieval_r1"] <= 1 and "eval/retrieval_r1_chance" in evals["qformer"]
    assert 0 <= evals["qformer"]["eval/itm_accuracy"] <= 1 and "eval/retrieval_r1_itm" in evals["qformer"]
    assert "eval/vqa_accuracy" in evals["generate"]

    model, info = Blip2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    processor = AutoProcessor.from_pretrained(out)
    for i, item in enumerate(heldout_questions(SyntheticConfig(), 1)):
        path = save(item["image"], str(tmp_path / f"q{i}.png"))
        prompt = f"USER : {item['question']} ASSISTANT :"
        ours = predict.predict(workdir, prompt, [path], max_new_tokens=3)
        inputs = processor(images=[Image.open(path).convert("RGB")], text=prompt, return_tensors="pt")
        assert hf_new_ids(model, inputs, 3).tolist()[: len(ours["token_ids"])] == ours["token_ids"]


@jobs.fixture
def instructblip_run(tmp):
    return train_and_export(
        tmp,
        "configs/blip2.py:tiny",
        "--config.model.llm_type=llm",
        "--config.model.qformer.text_input=True",
        "--config.model.qformer.num_layers=1",
        "--config.model.itc_embed_dim=0",
        "--config.stage_order=('generate',)",
        "--config.stages.generate.steps=3",
        "--config.stages.generate.batch_size=4",
        "--config.stages.generate.data.text_length=16",
        "--config.stages.generate.data.text_source=prompt",
        "--config.eval.num_questions=8",
    )


def test_instructblip_trains_with_the_instruction_in_the_qformer(instructblip_run, tmp_path):
    # The Q-Former reads the prompt (text_source="prompt") during training exactly as
    # InstructBlipProcessor hands it over at inference, so the export answers as predict does.
    from transformers import AutoProcessor, InstructBlipForConditionalGeneration

    workdir, rows, out = instructblip_run
    assert [r["stage"] for r in rows if "loss" in r] == ["generate"] * 3
    model, info = InstructBlipForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    processor = AutoProcessor.from_pretrained(out)
    for i, item in enumerate(heldout_questions(SyntheticConfig(), 2)):
        path = save(item["image"], str(tmp_path / f"q{i}.png"))
        prompt = f"USER : {item['question']} ASSISTANT :"
        ours = predict.predict(workdir, prompt, [path], max_new_tokens=3)
        inputs = processor(images=[Image.open(path).convert("RGB")], text=prompt, return_tensors="pt")
        assert "qformer_input_ids" in inputs
        assert hf_new_ids(model, inputs, 3).tolist()[: len(ours["token_ids"])] == ours["token_ids"]


# Slow (36 s): the clip path is covered piecewise by tests/models/test_video_models.py (one media item
# per clip, frame order seen, export refused) and tests/data/test_video_layouts.py (the layouts).
@pytest.mark.slow
def test_flamingo_trains_on_clips_and_refuses_export(tmp_path):
    """IDEFICS with frames_per_clip=4: each clip of the synthetic `video` task is resampled with frame
    embeddings into one media item; a few steps of both stages, the motion evaluation, no HF export."""
    workdir = str(tmp_path / "flamingo_video")
    stage = [
        f"--config.stages.{name}.{key}"
        for name in ("align", "instruct")
        for key in ("steps=2", "batch_size=4", "data.mix=()", "data.task=video", "data.max_images=4")
    ]
    cmd = ["-m", "mllm_jax.main", "--config=configs/flamingo.py:tiny", f"--workdir={workdir}", *COMMON]
    jobs.check(
        jobs.python(
            *cmd,
            *stage,
            "--config.model.llm.head_dim=8",
            "--config.model.xattn.head_dim=8",
            "--config.model.xattn.intermediate_size=64",
            "--config.model.use_resampler=True",
            "--config.model.frames_per_clip=4",
            "--config.eval.num_questions=0",
            "--config.eval.num_clips=4",
        )
    )
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in train_rows] == ["align"] * 2 + ["instruct"] * 2
    assert all(np.isfinite(r["loss"]) and r["train/skipped_steps"] == 0 for r in train_rows)
    assert any("eval/motion_accuracy" in r for r in rows)
    family, config = store.read_model_config(workdir)
    assert (family, config.frames_per_clip, config.perceiver.max_frames) == ("idefics", 4, 4)
    r = jobs.python("-m", "mllm_jax.convert", f"--from={workdir}", f"--to_hf={tmp_path / 'hf'}")
    assert r.returncode != 0 and "transformers has no equivalent" in r.stderr
    assert not (tmp_path / "hf").exists()
