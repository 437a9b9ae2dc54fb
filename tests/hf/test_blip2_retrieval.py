"""BLIP-2 stage 1 <-> HF Blip2ForImageTextRetrieval: ITC/ITM scores, bit-exact round trip, dispatch,
and export of a stage-1 model to Blip2ForConditionalGeneration without its heads."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from blip2_fixtures import ITC_DIM, NUM_QUERY_TOKENS, QFORMER_VOCAB, build_blip2, build_blip2_retrieval
from transformers import AutoConfig, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from mllm_jax.errors import ConversionError
from mllm_jax.families import store
from mllm_jax.hf import blip2_retrieval
from mllm_jax.hf.common import hf_to_params, normalize_keys, params_to_hf, read_safetensors
from mllm_jax.models import blip2_stage1
from mllm_jax.models.blip2 import Blip2


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    path = build_blip2_retrieval(str(tmp_path_factory.mktemp("blip2_itm")), seed=3)
    return path, store.load_pretrained(path)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    tokens = rng.integers(4, QFORMER_VOCAB, size=(3, 7))
    tokens[:, 0] = 1
    mask = np.ones_like(tokens)
    mask[1, 4:] = 0  # right padding
    mask[2, 2:] = 0
    return pixels, tokens, mask


def torch_scores(model, pixels, tokens, mask, itm: bool):
    with torch.no_grad():
        out = model(
            pixel_values=torch.tensor(pixels),
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            use_image_text_matching_head=itm,
        )
    return out.logits_per_image.numpy()


def test_itc_and_itm_scores_match_transformers(retrieval, inputs):
    path, pretrained = retrieval
    pixels, tokens, mask = inputs
    assert pretrained.family == "blip2" and pretrained.config.itc_embed_dim == ITC_DIM
    assert sorted(pretrained.params) == ["adapter", "vision"]  # the retrieval model has no LLM
    model = Blip2(pretrained.config)

    @jax.jit
    def scores(params, images, t, m):
        itc = blip2_stage1.itc_scores(
            blip2_stage1.image_embeddings(model, params, images),
            blip2_stage1.text_embeddings(model, params, t, m),
        )
        return itc, blip2_stage1.itm_logits(model, params, images, t, m)

    images = jnp.asarray(pixels.transpose(0, 2, 3, 1)[:, None])
    itc, itm = scores(pretrained.params, images, jnp.asarray(tokens), jnp.asarray(mask))
    torch_model = Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    ref_itc = torch_scores(torch_model, pixels, tokens, mask, itm=False)
    ref_itm = torch_scores(torch_model, pixels, tokens, mask, itm=True)
    assert ref_itc.shape == (3, 3) and ref_itm.shape == (3, 2)
    assert np.std(ref_itc) > 5e-3 and np.std(ref_itm) > 0.05  # far above the tolerance
    np.testing.assert_allclose(itc, ref_itc, atol=1e-4, rtol=0)
    np.testing.assert_allclose(itm, ref_itm, atol=1e-4, rtol=0)


def test_round_trip_is_bit_exact_and_loads_cleanly(retrieval, tmp_path):
    path, pretrained = retrieval
    tensors = read_safetensors(path)
    assert "temp" in pretrained.params["adapter"]  # HF stores none: import adds LAVIS's initial value
    exported = params_to_hf(pretrained.params, blip2_retrieval.rules(pretrained.config), "export")
    assert sorted(exported) == sorted(tensors)
    for k, v in tensors.items():
        assert exported[k].dtype == v.dtype and exported[k].tobytes() == v.tobytes(), k
    out = str(tmp_path / "export")
    store.save_pretrained(out, pretrained.family, pretrained.config, pretrained.params, pretrained.hf_config)
    ignore = {"transformers_version", "_name_or_path"}
    ca = {k: v for k, v in AutoConfig.from_pretrained(path).to_dict().items() if k not in ignore}
    cb = {k: v for k, v in AutoConfig.from_pretrained(out).to_dict().items() if k not in ignore}
    assert ca == cb
    model, info = Blip2ForImageTextRetrieval.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # a config written from ours alone converts back to the same config
    assert (
        blip2_retrieval.config_from_hf(blip2_retrieval.config_to_hf(pretrained.config)) == pretrained.config
    )


def test_dispatch_tells_retrieval_from_generation_and_keeps_the_image_token(tmp_path):
    path = build_blip2_retrieval(str(tmp_path / "itm"), image_token=True, cross_attention_frequency=1)
    pretrained = store.load_pretrained(path)
    assert store.architecture(pretrained.hf_config)[1] is blip2_retrieval
    store.save_pretrained(
        str(tmp_path / "out"), "blip2", pretrained.config, pretrained.params, pretrained.hf_config
    )
    with open(os.path.join(tmp_path / "out", "config.json")) as f:
        d = json.load(f)
    assert d["architectures"] == ["Blip2ForImageTextRetrieval"]
    assert d["image_token_index"] == pretrained.hf_config["image_token_index"] is not None
    a, b = read_safetensors(path), read_safetensors(str(tmp_path / "out"))
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_generation_export_drops_the_stage1_heads(tmp_path):
    """A stage-1 trained BLIP-2 (heads + LLM) exports to Blip2ForConditionalGeneration without them."""
    path = build_blip2(str(tmp_path / "gen"), text="opt", qformer_text_input=True)
    pretrained = store.load_pretrained(path)
    assert pretrained.config.itc_embed_dim == 0
    config = dataclasses.replace(pretrained.config, itc_embed_dim=ITC_DIM)
    rng = np.random.default_rng(0)
    d = pretrained.config.qformer.hidden_size
    heads = {
        "embeddings": {
            "word_embeddings": {"embedding": rng.normal(size=(QFORMER_VOCAB, d)).astype(np.float32)},
            "position_embeddings": {"embedding": rng.normal(size=(16, d)).astype(np.float32)},
        },
        "vision_projection": {
            "kernel": np.ones((d, ITC_DIM), np.float32),
            "bias": np.zeros(ITC_DIM, np.float32),
        },
        "text_projection": {
            "kernel": np.ones((d, ITC_DIM), np.float32),
            "bias": np.zeros(ITC_DIM, np.float32),
        },
        "itm_head": {"kernel": np.ones((d, 2), np.float32), "bias": np.zeros(2, np.float32)},
        "temp": np.asarray(0.07, np.float32),
    }
    params = dict(pretrained.params, adapter=dict(pretrained.params["adapter"], **heads))
    out = str(tmp_path / "out")
    store.save_pretrained(out, "blip2", config, params, pretrained.hf_config)
    model, info = Blip2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    a, b = read_safetensors(path), read_safetensors(out)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert store.load_pretrained(out).config == pretrained.config


def test_bad_configs_are_refused(retrieval):
    path, pretrained = retrieval
    d = json.loads(open(os.path.join(path, "config.json")).read())
    d["qformer_config"]["use_qformer_text_input"] = False
    with pytest.raises(ConversionError, match="use_qformer_text_input"):
        blip2_retrieval.config_from_hf(d)
    with pytest.raises(ConversionError, match="itc_embed_dim=0"):
        blip2_retrieval.config_to_hf(dataclasses.replace(pretrained.config, itc_embed_dim=0))
    # without the heads' tensors the checkpoint is not a retrieval model
    tensors = {k: v for k, v in read_safetensors(path).items() if not k.startswith("itm_head")}
    with pytest.raises(ConversionError, match="itm_head"):
        hf_to_params(normalize_keys(tensors, ()), blip2_retrieval.rules(pretrained.config), "partial")
    assert NUM_QUERY_TOKENS == pretrained.config.num_query_tokens
