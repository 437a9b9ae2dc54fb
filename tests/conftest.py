"""Shared fixtures: tiny HF checkpoints are built once per session (they cost seconds each)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import hf_fixtures  # noqa: E402

# name -> build_llava kwargs. Together they cover GQA, feature layers -2/-1/list, "default"/"full",
# CLIP/SigLIP, tied embeddings, llama3/linear RoPE scaling and the Mistral/Qwen2 decoders.
LLAVA_VARIANTS = {
    "clip_default": dict(),
    "clip_full_tied_llama3": dict(
        feature_layer=-1,
        strategy="full",
        text=dict(
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "siglip_qwen2_linear": dict(
        vision="siglip",
        feature_layer=-1,
        strategy="full",
        projector_act="gelu_pytorch_tanh",
        text=dict(model_type="qwen2", rope_scaling=dict(rope_type="linear", factor=2.0)),
    ),
    "clip_layers_mistral": dict(feature_layer=[-3, -1], text=dict(model_type="mistral", sliding_window=64)),
}


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """``llava_dir(name)`` -> path of the tiny HF LLaVA checkpoint for that variant (built once)."""
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            path = str(tmp_path_factory.mktemp(f"llava_{name}"))
            hf_fixtures.build_llava(path, seed=len(cache), **LLAVA_VARIANTS[name])
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("images"))
    return [
        hf_fixtures.save_image(d, seed, size) for seed, size in ((0, (20, 24)), (1, (32, 16)), (2, (16, 16)))
    ]
