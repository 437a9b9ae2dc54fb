"""IDEFICS parity with transformers: logits, clean export, bit-exact round trip and greedy decoding.

Conversion goes through ``mllm_jax.hf.idefics`` directly (read + normalize + rules), the same calls the
``mllm_jax.hf`` dispatcher makes for the other families.
"""

import dataclasses
import functools

import hf_fixtures
import idefics_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, IdeficsForVisionText2Text

from mllm_jax.errors import ConversionError
from mllm_jax.hf import idefics as conv
from mllm_jax.models.idefics import Idefics
from mllm_jax.models.llm import init_cache
from mllm_jax.models.xattn import latest_image_mask

VARIANTS = sorted(fx.IDEFICS_VARIANTS)
IMAGES = [
    hf_fixtures.random_image(seed, size) for seed, size in ((0, (20, 24)), (1, (32, 16)), (2, (16, 16)))
]
# Two prompts, right-padded: the first interleaves two images, the second has one (and a padding image).
MULTI = [
    ["USER :", IMAGES[0], "what color is this", IMAGES[1], "? ASSISTANT :"],
    ["describe", IMAGES[2], "there"],
]
SINGLE = [["USER :", IMAGES[1], "describe this image . ASSISTANT :"]]


@pytest.fixture(scope="module")
def processor():
    return fx.make_processor()


def load(model_dir):
    _, _, config, params = hf_fixtures.convert(model_dir, conv)
    return config, params


@functools.cache
def forward_fn(config):
    return jax.jit(
        lambda p, t, i, a, m: Idefics(config).apply({"params": p}, t, i, None, a, image_mask_BxTxM=m)[0]
    )


def our_logits(config, params, inputs, pixel_values=None):
    pixels = inputs["pixel_values"] if pixel_values is None else pixel_values
    args = (
        inputs["input_ids"],
        fx.pixels_to_ours(pixels),
        inputs["attention_mask"],
        inputs["image_attention_mask"],
    )
    return np.asarray(forward_fn(config)(params, *(jnp.asarray(np.asarray(a)) for a in args)))


def torch_logits(model_dir, inputs):
    model = IdeficsForVisionText2Text.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**inputs).logits.numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, processor):
    """``converted(variant)`` -> (HF dir, config, params, multi-image inputs, our logits), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            path = str(tmp_path_factory.mktemp(f"idefics_{name}"))
            fx.build_idefics(path, seed=VARIANTS.index(name), **fx.IDEFICS_VARIANTS[name])
            config, params = load(path)
            inputs = processor(text=MULTI, return_tensors="pt")
            cache[name] = (path, config, params, inputs, our_logits(config, params, inputs))
        return cache[name]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, converted):
    model_dir, config, params, inputs, ours = converted(variant)
    ref = torch_logits(model_dir, inputs)
    assert ours.shape == ref.shape == (2, inputs["input_ids"].shape[1], config.total_vocab_size)
    valid = inputs["attention_mask"].numpy().astype(bool)  # padded rows differ in position ids only
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    # the gates are open: the images matter, so the comparison above covers the vision side
    blank = our_logits(config, params, inputs, np.zeros_like(inputs["pixel_values"]))
    assert np.abs(blank - ours)[valid].max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_loads_cleanly_round_trips_and_gives_same_logits(variant, converted, tmp_path):
    model_dir, config, params, inputs, ours = converted(variant)
    out = str(tmp_path / "export")
    base, original, _, _ = hf_fixtures.convert(model_dir, conv)
    hf_fixtures.export_exact(out, conv, config, params, original, base)
    model, info = IdeficsForVisionText2Text.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        exported = model.eval()(**inputs).logits.numpy()
    valid = inputs["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(exported[valid], ours[valid], atol=1e-4, rtol=0)

    ignore = {"transformers_version", "_name_or_path"}
    ca = {k: v for k, v in AutoConfig.from_pretrained(model_dir).to_dict().items() if k not in ignore}
    cb = {k: v for k, v in AutoConfig.from_pretrained(out).to_dict().items() if k not in ignore}
    assert ca == cb
    # and the config alone survives ours -> HF -> ours
    assert conv.config_from_hf(conv.config_to_hf(config)) == config


def test_configs_transformers_cannot_load_are_refused(converted):
    _, config, _, _, _ = converted("float_i1_resampler_tied")
    gqa = dataclasses.replace(config, llm=dataclasses.replace(config.llm, num_kv_heads=2))
    video = dataclasses.replace(config, perceiver=dataclasses.replace(config.perceiver, max_frames=4))
    for bad in (gqa, video):
        with pytest.raises(ConversionError):
            conv.config_to_hf(bad)
    d = conv.config_to_hf(config)
    with pytest.raises(ConversionError, match="must divide"):
        conv.config_from_hf({**d, "cross_layer_interval": 3})


def test_image_mask_from_tokens_matches_the_processor(processor):
    prompts = [*MULTI, ["a", IMAGES[0], "red </s> blue", IMAGES[1], "circle </s> star"]]
    inputs = processor(text=prompts, return_tensors="pt")
    tok = processor.tokenizer
    ours = latest_image_mask(
        jnp.asarray(inputs["input_ids"].numpy()),
        tok.convert_tokens_to_ids(hf_fixtures.IMAGE_TOKEN),
        inputs["image_attention_mask"].shape[-1],
        tok.eos_token_id,
    )
    np.testing.assert_array_equal(np.asarray(ours), inputs["image_attention_mask"].numpy().astype(bool))


def greedy(config, params, tokens_1xT, pixels, image_mask_1xTxM, steps):
    """Prefill + one-token steps over a KV cache; each new token sees the images the last prompt token
    sees (HF's rule in ``_update_model_kwargs_for_generation``).

    Returns (prefill logits ``[1, L, V]``, per-step next-token logits ``[steps, V]``, new ids)."""
    model = Idefics(config)
    apply = functools.partial(jax.jit(model.apply, static_argnames="method"), {"params": params})
    length = tokens_1xT.shape[1]
    media = apply(pixels, method="media")  # once: the cross-attention K/V are recomputed from it per step
    cache = init_cache(config.llm, 1, length + steps)
    positions = jnp.arange(length)[None]
    embeds = apply(tokens_1xT, method="embed")
    zero = jnp.zeros((1,), jnp.int32)
    prefill, cache = apply(embeds, positions, None, cache, zero, media, image_mask_1xTxM, method="decode")
    step_mask = image_mask_1xTxM[:, -1:]
    next_logits, out_logits, out_ids = prefill[:, -1], [], []
    for i in range(steps):
        token = jnp.argmax(next_logits, -1)
        out_logits.append(np.asarray(next_logits[0]))
        out_ids.append(int(token[0]))
        index = jnp.full((1,), length + i, jnp.int32)
        embeds = apply(token[:, None], method="embed")
        logits, cache = apply(embeds, index[:, None], None, cache, index, media, step_mask, method="decode")
        next_logits = logits[:, 0]
    return np.asarray(prefill), np.stack(out_logits), out_ids


def test_greedy_decoding_matches_generate(converted, processor):
    model_dir, config, params, _, _ = converted("vector_i2_resampler_qk_addvocab")
    inputs = processor(text=SINGLE, return_tensors="pt")
    model = IdeficsForVisionText2Text.from_pretrained(model_dir).eval()
    steps = 6
    with torch.no_grad():
        ref_logits = model(**inputs).logits.numpy()
        ref = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    ref_ids = ref.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    prefill, step_logits, ours = greedy(
        config,
        params,
        jnp.asarray(inputs["input_ids"].numpy()),
        jnp.asarray(fx.pixels_to_ours(inputs["pixel_values"])),
        jnp.asarray(inputs["image_attention_mask"].numpy()),
        steps,
    )
    np.testing.assert_allclose(prefill, ref_logits, atol=1e-4, rtol=0)  # a single-image prompt
    assert len(ref_ids) == steps and ours == ref_ids  # (HF would stop early at an EOS)
    np.testing.assert_allclose(step_logits, torch.cat(ref.logits).numpy(), atol=1e-4, rtol=0)
