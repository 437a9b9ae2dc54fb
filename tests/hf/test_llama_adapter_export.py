"""LLaMA-Adapter's HF directory: the base exports as a LlamaForCausalLM that transformers loads with no
missing or unexpected keys, and whose PyTorch logits are our base LLaMA's, and our adapter model's with
the gates at zero; the adapter and tower travel beside it and read back bit for bit."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from mllm_jax.errors import ConversionError
from mllm_jax.families import store
from mllm_jax.hf import llama_adapter as hf_adapter
from mllm_jax.models.llama_adapter import LlamaAdapter, LlamaAdapterConfig
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.vit import VitConfig

CONFIG = LlamaAdapterConfig(
    VitConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, image_size=16, patch_size=8),
    LlmConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_positions=128,
    ),  # fmt: skip
    adapter_len=3,
    adapter_layers=1,
    image_token_id=5,
)
TOKENS = np.array([[1, 5, 7, 8, 9, 10, 11, 2]], np.int32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = LlamaAdapter(CONFIG)
    images = jax.random.normal(jax.random.key(1), (1, 1, 16, 16, 3))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), TOKENS, images)["params"])
    # trained-looking gates, so that the adapter model differs from its base
    params["adapter"]["gates"] = jax.random.normal(jax.random.key(2), params["adapter"]["gates"].shape)
    params = jax.tree.map(np.asarray, params)
    out = str(tmp_path_factory.mktemp("llama_adapter_hf"))
    store.save_pretrained(out, "llama_adapter", CONFIG, params)
    return model, params, images, out


def test_the_base_loads_in_transformers_as_our_llama_with_gates_at_zero(exported):
    from transformers import LlamaForCausalLM

    model, params, images, out = exported
    assert {hf_adapter.CONFIG_FILE, hf_adapter.WEIGHTS_FILE, "model.safetensors"} <= set(os.listdir(out))
    hf, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    closed = {**params, "adapter": {**params["adapter"], "gates": np.zeros_like(params["adapter"]["gates"])}}
    forward = jax.jit(lambda p: model.apply({"params": p}, TOKENS, images)[0])
    np.testing.assert_allclose(np.asarray(forward(closed)), theirs, atol=2e-5)
    assert not np.allclose(np.asarray(forward(params)), theirs, atol=1e-3)  # the gates are the difference


def test_the_directory_reads_back_bit_for_bit(exported):
    _, params, _, out = exported
    pretrained, assets = store.load_any(out)
    assert pretrained.family == "llama_adapter" and assets == out
    assert pretrained.config == CONFIG
    chex.assert_trees_all_equal(pretrained.params, params)
    assert pretrained.hf_config["architectures"] == ["LlamaForCausalLM"]


def test_adapter_config_without_its_weights_is_one_clear_error(exported, tmp_path):
    _, params, _, out = exported
    for name in os.listdir(out):
        if name != hf_adapter.WEIGHTS_FILE:
            os.symlink(os.path.join(out, name), tmp_path / name)
    with pytest.raises(ConversionError, match=hf_adapter.WEIGHTS_FILE):
        store.load_pretrained(str(tmp_path))


def test_widths_follow_the_llm(exported):
    _, params, _, _ = exported
    shapes = jax.tree.map(jnp.shape, params["adapter"])
    assert shapes["visual_proj"]["kernel"] == (32, 32) and shapes["prompts"] == (1, 3, 32)
