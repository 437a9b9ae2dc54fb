"""Stand-alone vision towers and decoders against transformers, plus safetensors I/O guarantees."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_fixtures import build_causal_lm, build_vision
from transformers import AutoModel, AutoModelForCausalLM

from mllm_jax import families
from mllm_jax.errors import ConversionError
from mllm_jax.families import store
from mllm_jax.hf.common import read_safetensors, write_safetensors


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_vision_tower_matches_transformers(vision, tmp_path):
    model_dir = build_vision(str(tmp_path / vision), vision, seed=3)
    pretrained = store.load_pretrained(model_dir)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = AutoModel.from_pretrained(model_dir).eval()(torch.tensor(pixels), output_hidden_states=True)
    module = families.build("vit", pretrained.config)
    hidden, pooled = jax.jit(lambda p, x: module.apply({"params": p}, x))(
        pretrained.params, jnp.asarray(pixels.transpose(0, 2, 3, 1))
    )
    assert len(hidden) == len(ref.hidden_states)
    for ours, theirs in zip(hidden, ref.hidden_states, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-4, rtol=0)


DECODERS = {
    "llama_gqa": dict(),
    "llama_bias_tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=8),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=1),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_matches_transformers_and_exports_cleanly(name, tmp_path):
    model_dir = build_causal_lm(str(tmp_path / name), seed=5, **DECODERS[name])
    pretrained = store.load_pretrained(model_dir)
    tokens = np.random.default_rng(1).integers(0, 40, size=(2, 20))
    module = families.build("llm", pretrained.config)

    @jax.jit
    def logits_fn(params, tokens):
        return module.apply({"params": params}, module.apply({"params": params}, tokens, method="embed"))[0]

    ours = np.asarray(logits_fn(pretrained.params, jnp.asarray(tokens)))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    out = str(tmp_path / "export")
    store.save_pretrained(
        out, pretrained.family, pretrained.config, pretrained.params, pretrained.hf_config, model_dir
    )
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(exported).__name__ == pretrained.hf_config["architectures"][0]
    with torch.no_grad():
        np.testing.assert_allclose(
            exported.eval()(torch.tensor(tokens)).logits.numpy(), ref, atol=1e-6, rtol=0
        )


def test_bf16_checkpoint_round_trips_in_bf16(tmp_path):
    src = str(tmp_path / "bf16")
    model = AutoModel.from_pretrained(build_vision(str(tmp_path / "f32"), "clip")).to(torch.bfloat16)
    model.save_pretrained(src)
    pretrained = store.load_pretrained(src)
    assert pretrained.params["position_embedding"].dtype == ml_dtypes.bfloat16
    out = str(tmp_path / "out")
    store.save_pretrained(out, pretrained.family, pretrained.config, pretrained.params, pretrained.hf_config)
    a, b = read_safetensors(src), read_safetensors(out)
    assert (
        all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a) and a.keys() == b.keys()
    )
    reloaded = AutoModel.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_sharded_checkpoints_are_read_and_written(tmp_path):
    model_dir = build_vision(str(tmp_path / "clip"), "clip")
    tensors = read_safetensors(model_dir)
    sharded = str(tmp_path / "sharded")
    write_safetensors(sharded, tensors, max_shard_bytes=20_000)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 1
    again = read_safetensors(sharded)
    assert again.keys() == tensors.keys() and all(np.array_equal(again[k], tensors[k]) for k in tensors)
    os.rename(os.path.join(model_dir, "config.json"), os.path.join(sharded, "config.json"))
    model, info = AutoModel.from_pretrained(
        sharded, output_loading_info=True
    )  # transformers reads our shards
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_pickled_checkpoints_are_refused_with_a_clear_error(tmp_path):
    model_dir = build_vision(str(tmp_path / "clip"), "clip")
    os.remove(os.path.join(model_dir, "model.safetensors"))
    open(os.path.join(model_dir, "pytorch_model.bin"), "wb").close()
    with pytest.raises(ConversionError, match="safetensors is required"):
        store.load_pretrained(model_dir)


def test_unsupported_architecture_is_named(tmp_path):
    model_dir = build_vision(str(tmp_path / "clip"), "clip")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ConversionError, match="'gpt2'.*not supported"):
        store.load_pretrained(model_dir)
