"""LLaVA parity with transformers: logits, export, and the bit-exact round trip through `convert`."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LLAVA_VARIANTS
from PIL import Image
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from mllm_jax import families
from mllm_jax.families import store
from mllm_jax.hf.common import read_safetensors

PROMPT = "USER : <image> what color is this <image> ? ASSISTANT :"


def hf_inputs(model_dir, image_files):
    processor = AutoProcessor.from_pretrained(model_dir)
    images = [Image.open(p).convert("RGB") for p in image_files[:2]]
    return processor(images=images, text=PROMPT, return_tensors="np")


def torch_logits(model_dir, inputs):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(inputs["input_ids"]), pixel_values=torch.tensor(inputs["pixel_values"])
        )
    return out.logits.numpy()


def our_logits(pretrained, inputs):
    model = families.build(pretrained.family, pretrained.config)
    images = inputs["pixel_values"].transpose(0, 2, 3, 1)[None]
    fn = jax.jit(lambda p, t, i: model.apply({"params": p}, t, i)[0])
    return np.asarray(fn(pretrained.params, jnp.asarray(inputs["input_ids"]), jnp.asarray(images)))


@pytest.mark.parametrize("variant", sorted(LLAVA_VARIANTS))
def test_logits_match_transformers(variant, llava_dir, image_files):
    model_dir = llava_dir(variant)
    inputs = hf_inputs(model_dir, image_files)
    ours = our_logits(store.load_pretrained(model_dir), inputs)
    ref = torch_logits(model_dir, inputs)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["clip_default", "siglip_qwen2_linear"])
def test_export_loads_cleanly_and_gives_same_logits(variant, llava_dir, image_files, tmp_path):
    model_dir = llava_dir(variant)
    pretrained = store.load_pretrained(model_dir)
    out = str(tmp_path / "export")
    store.save_pretrained(
        out, pretrained.family, pretrained.config, pretrained.params, pretrained.hf_config, model_dir
    )
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs = hf_inputs(out, image_files)  # the exported processor works too
    np.testing.assert_allclose(torch_logits(out, inputs), our_logits(pretrained, inputs), atol=1e-4, rtol=0)


def run(*args):
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    return r


@pytest.mark.parametrize("variant", ["clip_full_tied_llama3", "clip_layers_mistral"])
def test_round_trip_through_convert_is_bit_exact(variant, llava_dir, tmp_path):
    model_dir = llava_dir(variant)
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    r = run("mllm_jax.convert", f"--from_hf={model_dir}", f"--to={ckpt}")
    assert r.returncode == 0, r.stderr
    r = run("mllm_jax.convert", f"--from={ckpt}", f"--to_hf={back}")
    assert r.returncode == 0, r.stderr
    a, b = read_safetensors(model_dir), read_safetensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    ignore = {"transformers_version", "_name_or_path"}
    ca = {k: v for k, v in AutoConfig.from_pretrained(model_dir).to_dict().items() if k not in ignore}
    cb = {k: v for k, v in AutoConfig.from_pretrained(back).to_dict().items() if k not in ignore}
    assert ca == cb
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        with open(os.path.join(model_dir, name)) as f1, open(os.path.join(back, name)) as f2:
            assert json.load(f1) == json.load(f2), name
