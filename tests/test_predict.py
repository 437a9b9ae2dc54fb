"""`python -m mllm_jax.predict` against transformers' greedy `generate` with the model's processor."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mllm_jax import predict

PROMPT = "USER : <image> what is in this <image> picture ? ASSISTANT :"
MAX_NEW = 12


def hf_generate(model_dir, image_files, prompt=PROMPT, n_images=2):
    processor = AutoProcessor.from_pretrained(model_dir)
    images = [Image.open(p).convert("RGB") for p in image_files[:n_images]]
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=MAX_NEW, output_logits=True, return_dict_in_generate=True
    )
    ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ids, strict=False)
    ]
    return ids, logprobs


@pytest.mark.parametrize("variant", ["clip_default", "clip_full_tied_llama3", "siglip_qwen2_linear"])
def test_greedy_equals_hf_generate(variant, llava_dir, image_files):
    model_dir = llava_dir(variant)
    ids, logprobs = hf_generate(model_dir, image_files)
    result = predict.predict(model_dir, PROMPT, image_files[:2], max_new_tokens=MAX_NEW)
    assert result["token_ids"] == ids
    np.testing.assert_allclose(result["logprobs"], logprobs, atol=1e-3)
    assert isinstance(result["text"], str)


def run_predict(*flags):
    return subprocess.run([sys.executable, "-m", "mllm_jax.predict", *flags], capture_output=True, text=True)


def test_cli_json_on_our_checkpoint_equals_hf(llava_dir, image_files, tmp_path):
    model_dir = llava_dir("clip_layers_mistral")
    ckpt = str(tmp_path / "ckpt")
    r = subprocess.run(
        [sys.executable, "-m", "mllm_jax.convert", f"--from_hf={model_dir}", f"--to={ckpt}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    prompt = "USER : <image> describe this picture . ASSISTANT :"
    ids, logprobs = hf_generate(model_dir, image_files, prompt, n_images=1)
    r = run_predict(
        f"--model={ckpt}",
        f"--image={image_files[0]}",
        f"--prompt={prompt}",
        f"--max_new_tokens={MAX_NEW}",
        "--format=json",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout holds only the result; logs went to stderr
    assert set(result) == {"text", "token_ids", "logprobs"}
    assert result["token_ids"] == ids
    np.testing.assert_allclose(result["logprobs"], logprobs, atol=1e-3)


def test_sampling_is_seeded_and_top_k_1_is_greedy(llava_dir, image_files):
    model_dir = llava_dir("clip_default")
    kw = dict(image_paths=image_files[:2], max_new_tokens=MAX_NEW)
    greedy = predict.predict(model_dir, PROMPT, **kw)
    a = predict.predict(model_dir, PROMPT, temperature=1.5, seed=3, **kw)
    b = predict.predict(model_dir, PROMPT, temperature=1.5, seed=3, **kw)
    assert a == b
    assert (
        predict.predict(model_dir, PROMPT, temperature=1.0, top_k=1, seed=4, **kw)["token_ids"]
        == greedy["token_ids"]
    )
    nucleus = predict.predict(model_dir, PROMPT, temperature=1.0, top_p=1e-6, seed=5, **kw)
    assert nucleus["token_ids"] == greedy["token_ids"]  # a tiny nucleus keeps only the top token


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image={img}", "--prompt=USER : <image> <image> what ?"], "2 <image> placeholder"),
        (["--image=/nonexistent.png", "--prompt=USER : <image> what ?"], "no such file"),
        (["--image={txt}", "--prompt=USER : <image> what ?"], "not a readable image"),
        (["--image={img}", "--prompt=USER : <image> what ?", "--max_new_tokens=0"], "max_new_tokens"),
        (["--image={img}", "--prompt=USER : <image> what ?", "--top_p=0"], "top_p"),
    ],
)
def test_bad_input_gives_one_clear_line_and_exit_2(flags, message, llava_dir, image_files, tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    flags = [f.format(img=image_files[0], txt=txt) for f in flags]
    r = run_predict(f"--model={llava_dir('clip_default')}", *flags)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_missing_model_dir_is_reported(tmp_path):
    r = run_predict(f"--model={tmp_path / 'nope'}", "--prompt=hi")
    assert r.returncode == 2 and "no such directory" in r.stderr
