"""Motion accuracy: scoring of known answers, and the eval loop around a fake generate that reads the
motion from the pixels it is given (so the static baseline loses exactly what needs the motion)."""

from __future__ import annotations

import json
import os

import jobs
import numpy as np
import pytest
from commands import SMALL

from mllm_jax.data.layouts import ModelSpec
from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.data.video import DIRECTIONS, heldout_clips
from mllm_jax.evaluation import synthetic_video as video
from mllm_jax.evaluation.decoder import Decoder
from mllm_jax.evaluation.synthetic_vqa import first_word
from mllm_jax.inference import generate

CONFIG = SyntheticConfig()
SPEC = ImageSpec(32, mode="resize")
TPI = 4


def test_motion_rows_on_known_answers():
    items = [
        {"type": "direction", "answer": "left"},
        {"type": "moving_color", "answer": "red"},
        {"type": "direction", "answer": "up"},
        {"type": "direction", "answer": "down"},
    ]
    rows = video.motion_rows(["left", "blue", "down", "down"], items, "_static")
    assert rows == pytest.approx(
        {
            "eval/motion_accuracy_static": 2 / 3,
            "eval/motion_accuracy_static/direction": 2 / 3,
            "eval/motion_accuracy_static/moving_color": 0.0,
        }
    )


def _oracle_direction(pixels_TxHxWxC: np.ndarray) -> str:
    """Where the pixels that changed between the first and last frame moved to; "left" when none did."""
    first, last = pixels_TxHxWxC[0], pixels_TxHxWxC[-1]
    background = SPEC(np.zeros((32, 32, 3), np.uint8))[0, 0]
    changed = (first != last).any(-1)
    if not changed.any():
        return "left"
    start = np.argwhere(changed & (first != background).any(-1)).mean(0)
    end = np.argwhere(changed & (last != background).any(-1)).mean(0)
    dy, dx = np.round(end - start, 3)
    step = (int(np.sign(dx)), int(np.sign(dy)))
    return next(d for d, v in DIRECTIONS.items() if v == step)


def test_eval_loop_with_a_fake_generate(monkeypatch):
    tok = build_tokenizer(vocabulary(CONFIG))
    image_id = tok.convert_tokens_to_ids("<image>")
    calls = []

    def fake_generate(
        model, params, prompts, pixels, *, max_new_tokens, eos_ids, pad_id, embed_kwargs, mesh, rules
    ):
        assert mesh is None and rules is None and not embed_kwargs  # no mesh given: one device
        calls.append((len(prompts), pixels.shape))
        out = []
        for prompt, clip in zip(prompts, pixels, strict=True):
            # every clip is T image blocks in frame order, as training lays it out
            assert prompt.count(image_id) == CONFIG.num_frames * TPI
            answer = _oracle_direction(clip) if "way" in tok.decode(prompt) else "red"
            out.append((tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id], []))
        return out

    monkeypatch.setattr(generate, "generate", fake_generate)
    decoder = Decoder(None, None, tok, SPEC, ModelSpec(image_id, TPI), "tiny", batch_size=4)
    rows = video.motion_metrics(decoder, CONFIG, num_clips=10)
    # 3 chunks of 10 padded to 4 rows each, moving then static
    assert calls == [(4, (4, CONFIG.num_frames, 32, 32, 3))] * 6
    items = heldout_clips(CONFIG, 10)
    directions = [it for it in items if it["type"] == "direction"]
    colors = [it for it in items if it["type"] == "moving_color"]
    assert rows["eval/motion_accuracy"] == rows["eval/motion_accuracy/direction"] == 1.0
    # with every frame the first, nothing moves: the oracle's fallback is right only for "left" clips
    left = np.mean([it["answer"] == "left" for it in directions])
    assert rows["eval/motion_accuracy_static"] == pytest.approx(left) and left < 1
    red = np.mean([it["answer"] == "red" for it in colors])
    assert rows["eval/motion_accuracy/moving_color"] == rows["eval/motion_accuracy_static/moving_color"]
    assert rows["eval/motion_accuracy/moving_color"] == pytest.approx(red)


VIDEO_FLAGS = [  # tiny_video's own eval and a few steps
    "--config.stages.align.steps=2",
    "--config.stages.instruct.steps=3",
    "--config.eval.num_questions=0",
    "--config.eval.num_clips=4",
    "--config.eval.batch_size=4",
    "--config.eval.stages=('instruct',)",
]


@jobs.fixture
def video_run(tmp):
    """``tiny_video`` shrunk through ``python -m mllm_jax.main``, then ``evaluate --task=synthetic_video``
    on the workdir and ``convert --to_hf``: ``(workdir, evaluate's printed result, its predictions file,
    HF dir)``."""
    workdir, out_hf, preds = str(tmp / "run"), str(tmp / "hf"), str(tmp / "video.jsonl")
    small = [f for f in SMALL if not f.startswith("--config.eval.")]  # its small model, tiny_video's eval
    config = "--config=configs/llava.py:tiny_video"
    jobs.check(jobs.python("-m", "mllm_jax.main", config, f"--workdir={workdir}", *small, *VIDEO_FLAGS))
    flags = ["--task=synthetic_video", "--limit=4", "--batch_size=4", f"--predictions={preds}"]
    r = jobs.check(jobs.python("-m", "mllm_jax.evaluate", f"--model={workdir}", *flags))
    result = json.loads(r.stdout.strip().splitlines()[-1])
    jobs.check(jobs.python("-m", "mllm_jax.convert", f"--from={workdir}", f"--to_hf={out_hf}"))
    return workdir, result, preds, out_hf


def test_trained_workdir_through_evaluate_predict_and_the_hf_export(video_run, tmp_path):
    """A clip is T consecutive images everywhere: training's eval, ``evaluate --task=synthetic_video``,
    ``predict`` with T ``--image`` flags and the exported ``LlavaForConditionalGeneration`` agree."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm_jax import predict

    workdir, result, preds, out_hf = video_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        (logged,) = [row for row in map(json.loads, f) if "eval/motion_accuracy" in row]
    assert logged["stage"] == "instruct" and "eval/motion_accuracy_static" in logged

    with open(preds) as f:
        lines = [json.loads(line) for line in f]
    items = heldout_clips(CONFIG, 4)
    assert [(line["question"], line["answers"]) for line in lines] == [
        (it["question"], [it["answer"]]) for it in items
    ]
    expected = video.motion_rows([line["prediction"] for line in lines], items)
    expected |= video.motion_rows([line["prediction_static"] for line in lines], items, "_static")
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    assert {k: logged[k] for k in expected} == pytest.approx(expected)  # training scored the same answers

    model = LlavaForConditionalGeneration.from_pretrained(out_hf)
    processor = AutoProcessor.from_pretrained(out_hf)
    for i, (item, line) in enumerate(zip(items[:2], lines, strict=False)):
        paths = [str(tmp_path / f"clip{i}_{k}.png") for k in range(len(item["frames"]))]
        for path, frame in zip(paths, item["frames"], strict=True):
            Image.fromarray(frame).save(path)
        prompt = line["prompt"]  # the template's generation prompt: "USER : <image> x T question ASSISTANT :"
        ours = predict.predict(workdir, prompt, paths, max_new_tokens=3)
        assert first_word(ours["text"]) == line["prediction"]
        frames = [Image.open(p).convert("RGB") for p in paths]
        inputs = processor(images=frames, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=3)[
                0, inputs["input_ids"].shape[1] :
            ]
        assert ours["token_ids"] == ids.tolist()
