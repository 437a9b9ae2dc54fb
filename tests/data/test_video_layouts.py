"""A clip of T frames for a model that merges it into one media item (``ModelSpec.frames_per_image`` = T):
T ``<image>`` placeholders in a row take one slot of the family's layout, the batch keeps the T frames."""

import collections

import numpy as np
import pytest

from mllm_jax import families
from mllm_jax.data.layouts import ModelSpec, count_images, truncate
from mllm_jax.data.pipeline import DataConfig, Encoder
from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.templates import encode_document
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.data.video import clip_record, make_clip
from mllm_jax.errors import DataError
from mllm_jax.models.blip2 import Blip2Config
from mllm_jax.models.idefics import IdeficsConfig
from mllm_jax.models.mllm import LlavaConfig

FAKE = "<fake_token_around_image>"
CONFIG = SyntheticConfig()
T = CONFIG.num_frames
Q = 4  # tokens per image block
IMAGE = ImageSpec(32, mode="resize")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocabulary(CONFIG), extra_special=("<image>", FAKE))


def _spec(tok, family: str, frames: int) -> ModelSpec:
    image, fake = tok.convert_tokens_to_ids(["<image>", FAKE])
    layouts = {
        "llava": ModelSpec(image, Q, frames_per_image=frames),
        "idefics": ModelSpec(image, 64, layout="wrapped", around_token_id=fake, frames_per_image=frames),
        "blip2": ModelSpec(image, Q, layout="prefix", frames_per_image=frames),
    }
    return layouts[family]


def _encoder(tok, spec, max_images=T, skipped=None):
    return Encoder(DataConfig(task="video", max_length=40, max_images=max_images), tok, IMAGE, spec, skipped)


@pytest.mark.parametrize("family", ["llava", "idefics", "blip2"])
def test_a_clip_takes_one_slot_and_keeps_its_frames(tok, family):
    record = clip_record(CONFIG, "train", 3, T)
    example = _encoder(tok, _spec(tok, family, T))(record)
    # the same tokens as the question asked about one image
    one = dict(record, images=record["images"][:1])
    one["turns"] = [
        ("user", record["turns"][0][1].replace(" ".join(["<image>"] * T), "<image>")),
        record["turns"][1],
    ]
    want = _encoder(tok, _spec(tok, family, 1), max_images=1)(one)
    np.testing.assert_array_equal(example["tokens"], want["tokens"])
    np.testing.assert_array_equal(example["targets"], want["targets"])
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (example["tokens"] == image_id).sum() == (1 if family == "idefics" else Q)
    if family == "idefics":  # <fake> <image> <fake>, one image token for the clip
        fake = tok.convert_tokens_to_ids(FAKE)
        k = int(np.flatnonzero(example["tokens"] == image_id)[0])
        assert example["tokens"][k - 1] == fake and example["tokens"][k + 1] == fake
    want_frames = [IMAGE(f) for f in make_clip(CONFIG, "train", 3)["frames"]]
    np.testing.assert_array_equal(example["images"], np.stack(want_frames))
    assert count_images(example["tokens"], _spec(tok, family, T)) == T


def test_broken_clips_are_skipped_and_slots_must_hold_whole_clips(tok):
    spec = _spec(tok, "llava", T)
    skipped = collections.Counter()
    record = clip_record(CONFIG, "train", 3, T)
    short = dict(record, images=record["images"][1:])
    short["turns"] = [("user", record["turns"][0][1].replace("<image> ", "", 1)), record["turns"][1]]
    assert _encoder(tok, spec, skipped=skipped)(short) is None
    split = dict(
        record,
        turns=[
            ("user", record["turns"][0][1].replace("<image> <image>", "<image> a <image>", 1)),
            record["turns"][1],
        ],
    )
    assert _encoder(tok, spec, skipped=skipped)(split) is None
    assert skipped["clip_frames"] == 2
    with pytest.raises(DataError, match="multiple"):
        _encoder(tok, spec, max_images=T + 1)


def test_truncate_keeps_whole_clips(tok):
    spec = _spec(tok, "llava", T)
    items = [("text", "a"), *[("image", None)] * T, ("text", "red"), *[("image", None)] * T, ("text", "blue")]
    tokens, learn = encode_document(tok, items, spec)
    assert count_images(tokens, spec) == 2 * T
    second = np.flatnonzero(tokens == spec.image_token_id)[Q]  # the second clip's block starts here
    cut, _, n = truncate(tokens, learn, second + 1, spec)
    assert n == T and len(cut) == second


def test_families_set_frames_per_image_from_the_model(tok):
    image = tok.convert_tokens_to_ids("<image>")
    cases = {
        "llava": (LlavaConfig(image_token_id=image, frames_per_clip=T, video_pool="mean"), T),
        "blip2": (Blip2Config(image_token_id=image, frames_per_clip=T), 1),  # concat: a slot per frame
        "idefics": (IdeficsConfig(image_token_id=image, frames_per_clip=T), T),
    }
    for family, (config, frames) in cases.items():
        assert families.FAMILIES[family].model_spec(config, tok).frames_per_image == frames, family
