"""`python -m mllm_jax.predict` against transformers' greedy `generate` with the model's processor. The
commands run as background jobs (tests/jobs.py)."""

import json

import hf_fixtures
import jobs
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


def run_predict(*flags, fresh=False):
    return jobs.python("-m", "mllm_jax.predict", *flags, fresh=fresh)


BUILD = """
import json, sys
sys.path.insert(0, "tests")
import hf_fixtures
for path, seed, kwargs in json.loads(sys.argv[1]):
    hf_fixtures.build_llava(path, seed=seed, **kwargs)
"""


@jobs.fixture
def cli_models(tmp):
    """The clip_default and clip_layers_mistral LLaVA variants (as conftest.py's llava_dir builds them)
    and an image, built for the command-line tests: ``({variant: HF dir}, image path)``."""
    from conftest import LLAVA_VARIANTS

    dirs = {name: str(tmp / name) for name in ("clip_default", "clip_layers_mistral")}
    specs = [(path, seed, LLAVA_VARIANTS[name]) for seed, (name, path) in enumerate(dirs.items())]
    jobs.check(jobs.python("-c", BUILD, json.dumps(specs)))
    return dirs, hf_fixtures.save_image(str(tmp), 0, (20, 24))


CLI_PROMPT = "USER : <image> describe this picture . ASSISTANT :"


@jobs.fixture
def cli_json_run(tmp):
    """``convert --from_hf`` of clip_layers_mistral, then ``predict --format=json`` on our checkpoint:
    ``(HF dir, image, convert's run, predict's run)``."""
    dirs, image = jobs.result("cli_models")
    model_dir, ckpt = dirs["clip_layers_mistral"], str(tmp / "ckpt")
    # both commands in their own interpreters (tests/zygote.py)
    converted = jobs.python("-m", "mllm_jax.convert", f"--from_hf={model_dir}", f"--to={ckpt}", fresh=True)
    flags = [f"--image={image}", f"--prompt={CLI_PROMPT}", f"--max_new_tokens={MAX_NEW}", "--format=json"]
    return model_dir, image, converted, run_predict(f"--model={ckpt}", *flags, fresh=True)


def test_cli_json_on_our_checkpoint_equals_hf(cli_json_run):
    model_dir, image, converted, r = cli_json_run
    assert converted.returncode == 0, converted.stderr
    ids, logprobs = hf_generate(model_dir, [image], CLI_PROMPT, n_images=1)
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


BAD_INPUT = [
    (["--image={img}", "--prompt=USER : <image> <image> what ?"], "2 <image> placeholder"),
    (["--image=/nonexistent.png", "--prompt=USER : <image> what ?"], "no such file"),
    (["--image={txt}", "--prompt=USER : <image> what ?"], "not a readable image"),
    (["--image={img}", "--prompt=USER : <image> what ?", "--max_new_tokens=0"], "max_new_tokens"),
    (["--image={img}", "--prompt=USER : <image> what ?", "--top_p=0"], "top_p"),
]


@jobs.fixture
def bad_input_runs(tmp):
    """``predict`` on clip_default with each of BAD_INPUT's flags, and on a missing model dir."""
    dirs, image = jobs.result("cli_models")
    txt = tmp / "notes.png"
    txt.write_text("not an image")
    model = f"--model={dirs['clip_default']}"
    runs = [run_predict(model, *[f.format(img=image, txt=txt) for f in flags]) for flags, _ in BAD_INPUT]
    return runs, run_predict(f"--model={tmp / 'nope'}", "--prompt=hi")


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[m for _, m in BAD_INPUT])
def test_bad_input_gives_one_clear_line_and_exit_2(case, bad_input_runs):
    r, message = bad_input_runs[0][case], BAD_INPUT[case][1]
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_missing_model_dir_is_reported(bad_input_runs):
    r = bad_input_runs[1]
    assert r.returncode == 2 and "no such directory" in r.stderr
