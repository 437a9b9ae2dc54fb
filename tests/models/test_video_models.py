"""Clips of T frames (``frames_per_clip``): IDEFICS resamples a clip with frame embeddings into one media
item; LLaVA and BLIP-2 keep a block per frame ("concat") or average the frames' features ("mean")."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from blip2_fixtures import tiny_blip2_config

from mllm_jax.errors import ConversionError
from mllm_jax.families import get as family
from mllm_jax.models.blip2 import Blip2
from mllm_jax.models.idefics import Idefics, IdeficsConfig
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import Llava, LlavaConfig
from mllm_jax.models.perceiver import PerceiverConfig
from mllm_jax.models.projector import ProjectorConfig
from mllm_jax.models.vit import VitConfig
from mllm_jax.models.xattn import XattnConfig

IMG = 39
T = 4
LLM = LlmConfig(
    vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8
)
VIT = VitConfig(hidden_size=12, intermediate_size=24, num_layers=1, num_heads=2, image_size=8, patch_size=4)
IDEFICS = IdeficsConfig(
    vision=dataclasses.replace(VIT, act="gelu"),
    perceiver=PerceiverConfig(embed_dim=12, num_latents=3, depth=1, num_heads=2, head_dim=6, mlp_dim=48),
    xattn=XattnConfig(hidden_size=16, intermediate_size=24, num_heads=2, head_dim=8, kv_dim=12),
    llm=LLM,
    image_token_id=IMG,
    eod_token_id=2,
)
IDEFICS_VIDEO = dataclasses.replace(
    IDEFICS, frames_per_clip=T, perceiver=dataclasses.replace(IDEFICS.perceiver, max_frames=T)
)
LLAVA = LlavaConfig(vision=VIT, projector=ProjectorConfig(12, 16), llm=LLM, image_token_id=IMG)
BLIP2 = tiny_blip2_config(num_layers=1, vocab_size=40, image_token_id=IMG)
TOKENS = jnp.array([[1, IMG, 5, 6, 7], [1, 8, IMG, 9, 10]])  # one clip (IDEFICS: one image token) each


def init(module, *args):
    return nn.meta.unbox(module.init(jax.random.key(0), *args)["params"])


def frames(n, seed=0):
    return jax.random.normal(jax.random.key(seed), (2, n, 8, 8, 3))


@pytest.fixture(scope="module")
def idefics_video():
    model = Idefics(IDEFICS_VIDEO)
    return model, init(model, TOKENS, frames(T))


def test_idefics_clip_is_one_media_item_that_sees_the_frame_order(idefics_video):
    model, params = idefics_video
    clip = frames(T)
    # (the gates start closed, so compare what the cross-attention reads: the media)
    media_of = jax.jit(lambda p, x: model.apply({"params": p}, x, method="media"))
    media = media_of(params, clip)
    chex.assert_shape(media, (2, 1, 3, 12))  # one set of latents per clip

    # its 0.02 init moves the media by ~1e-5 only: give it a trained-like scale
    def with_frame_embedding(emb):
        p = jax.tree_util.tree_map(lambda x: x, params)
        p["adapter"]["perceiver"]["frame_embedding"] = emb
        return p

    shape = params["adapter"]["perceiver"]["frame_embedding"].shape
    trained = with_frame_embedding(jax.random.normal(jax.random.key(1), shape))
    assert jnp.abs(media_of(trained, clip) - media_of(trained, clip[:, ::-1])).max() > 2e-4
    # ... because of the frame embeddings: without them the resampler reads the frames as a set
    none = with_frame_embedding(jnp.zeros(shape))
    chex.assert_trees_all_close(media_of(none, clip), media_of(none, clip[:, ::-1]), atol=2e-5)


def test_idefics_two_clips_give_two_media_items(idefics_video):
    model, params = idefics_video
    tokens = jnp.array([[1, IMG, 5, IMG, 6], [1, IMG, 7, 8, 9]])
    media = model.apply({"params": params}, frames(2 * T), method="media")
    chex.assert_shape(media, (2, 2, 3, 12))
    logits, _ = model.apply({"params": params}, tokens, frames(2 * T))
    chex.assert_tree_all_finite(logits)
    with pytest.raises(ValueError, match="whole number"):
        model.apply({"params": params}, tokens, frames(T + 1))


def test_idefics_one_frame_config_is_the_image_model():
    model = Idefics(IDEFICS)
    params = init(model, TOKENS, frames(2))
    assert "frame_embedding" not in params["adapter"]["perceiver"]  # old checkpoints stay loadable
    explicit = Idefics(dataclasses.replace(IDEFICS, frames_per_clip=1))
    chex.assert_trees_all_equal(
        model.apply({"params": params}, TOKENS, frames(2)),
        explicit.apply({"params": params}, TOKENS, frames(2)),
    )
    chex.assert_trees_all_equal_shapes(params, init(explicit, TOKENS, frames(2)))


def test_idefics_video_config_needs_frame_embeddings():
    with pytest.raises(ValueError, match="max_frames"):
        dataclasses.replace(IDEFICS, frames_per_clip=T).validate()
    IDEFICS_VIDEO.validate()


@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_mean_pool_is_the_mean_of_the_frames_features(family):
    base, module = {"llava": (LLAVA, Llava), "blip2": (BLIP2, Blip2)}[family]
    tokens = jnp.array([[IMG] * base.tokens_per_image + [1, 5]] * 2)
    images = frames(2 * T)  # two clips
    params = init(module(base), tokens, images)
    per_frame = module(base).apply({"params": params}, images, method="image_features")
    p, d = base.tokens_per_image, per_frame.shape[-1]
    mean = dataclasses.replace(base, frames_per_clip=T, video_pool="mean")
    mean.validate()
    pooled = module(mean).apply({"params": params}, images, method="image_features")
    want = per_frame.reshape(2, 2, T, p, d).mean(axis=2).reshape(2, 2 * p, d)
    chex.assert_trees_all_close(pooled, want, atol=1e-6)
    concat = dataclasses.replace(base, frames_per_clip=T)
    chex.assert_trees_all_equal(
        module(concat).apply({"params": params}, images, method="image_features"), per_frame
    )
    with pytest.raises(ValueError, match="video_pool"):
        dataclasses.replace(base, video_pool="max").validate()


def test_clip_merging_models_are_not_exported():
    for name, config in (
        ("idefics", IDEFICS_VIDEO),
        ("llava", dataclasses.replace(LLAVA, frames_per_clip=T, video_pool="mean")),
        ("blip2", dataclasses.replace(BLIP2, frames_per_clip=T, video_pool="mean")),
    ):
        with pytest.raises(ConversionError, match="transformers has no equivalent"):
            family(name).config_to_hf(config)
    # concatenated frames are plain images: LLaVA exports as before
    llava = family("llava")
    assert llava.config_to_hf(dataclasses.replace(LLAVA, frames_per_clip=T)) == llava.config_to_hf(LLAVA)
