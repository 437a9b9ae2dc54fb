"""Built-in synthetic clips: only the moving shape changes, the answers follow the motion, determinism,
split hygiene, the clip as T image blocks, and the config errors."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from mllm_jax.data.layouts import ModelSpec
from mllm_jax.data.pipeline import DataConfig, Encoder
from mllm_jax.data.sources import SyntheticSource
from mllm_jax.data.synthetic import COLOR_RGB, SyntheticConfig, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.data.video import DIRECTIONS, MOTION_TYPES, clip_record, heldout_clips, make_clip
from mllm_jax.errors import ConfigError
from mllm_jax.training.runconfig import from_config_dict

CONFIG = SyntheticConfig()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    return [make_clip(CONFIG, "train", i) for i in range(60)] + [
        make_clip(CONFIG, "heldout", i) for i in range(20)
    ]


def _centroid(mask_HxW: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask_HxW)
    return np.array([xs.mean(), ys.mean()])


def test_frames_differ_only_by_the_moving_shape(clips):
    for clip in clips:
        frames = clip["frames"]
        assert frames.shape == (CONFIG.num_frames, 32, 32, 3) and frames.dtype == np.uint8
        color = np.asarray(COLOR_RGB[clip["moving"]["color"]], np.uint8)
        changed_HxW = (frames != frames[:1]).any(-1).any(0)
        assert changed_HxW.any()
        for frame in frames:
            # every changed pixel is, in each frame, either the moving shape's color or background
            pixels = frame[changed_HxW]
            assert ((pixels == color).all(-1) | (pixels == 0).all(-1)).all()
        for obj in clip["objects"]:  # the still shapes keep their color at their centre
            x, y = int(obj["cx"]), int(obj["cy"])
            assert (frames[:, y, x] == COLOR_RGB[obj["color"]]).all()


def test_answers_follow_the_motion(clips):
    seen = set()
    for clip in clips:
        frames, (direction, moving_color) = clip["frames"], clip["questions"]
        assert [direction["type"], moving_color["type"]] == list(MOTION_TYPES)
        words = direction["question"].split()
        color = words[words.index("the") + 1]
        # the named color's pixels (still shapes of the same color add the same to both frames) shift
        first, last = (_centroid((f == COLOR_RGB[color]).all(-1)) for f in (frames[0], frames[-1]))
        step = np.sign(np.round(last - first, 3)).astype(int)
        assert tuple(step) == DIRECTIONS[direction["answer"]], direction
        assert moving_color["answer"] == color
        # the moving color is the one whose pixels change
        changed = frames[0][(frames[0] != frames[-1]).any(-1)]
        assert {tuple(p) for p in changed} - {(0, 0, 0)} == {COLOR_RGB[color]}
        seen.add(direction["answer"])
    assert seen == set(DIRECTIONS)


def test_deterministic_and_seeded():
    for split in ("train", "heldout"):
        a, b = make_clip(CONFIG, split, 5), make_clip(CONFIG, split, 5)
        np.testing.assert_array_equal(a["frames"], b["frames"])
        assert a["questions"] == b["questions"] and a["moving"] == b["moving"]
    other = SyntheticConfig(seed=1)
    assert any(
        make_clip(CONFIG, "train", i)["frames"].tobytes() != make_clip(other, "train", i)["frames"].tobytes()
        for i in range(5)
    )


def test_splits_are_disjoint():
    train = {make_clip(CONFIG, "train", i)["frames"].tobytes() for i in range(400)}
    heldout = {make_clip(CONFIG, "heldout", i)["frames"].tobytes() for i in range(100)}
    assert len(heldout) > 50
    assert not train & heldout


def test_num_frames_and_vocabulary():
    clip = make_clip(SyntheticConfig(num_frames=6), "train", 3)
    assert clip["frames"].shape[0] == 6 and len(clip["moving"]["path"]) == 6
    vocab = set(vocabulary(CONFIG))
    for item in heldout_clips(CONFIG, 8):
        assert set(item["question"].split()) | {item["answer"]} <= vocab
    with pytest.raises(ValueError, match="num_frames"):
        SyntheticConfig(num_frames=1)


def test_a_clip_is_t_image_blocks_in_frame_order():
    tok = build_tokenizer(vocabulary(CONFIG))
    image_id, tpi = tok.convert_tokens_to_ids("<image>"), 4
    spec = ImageSpec(32, mode="resize")
    encoder = Encoder(
        DataConfig(task="video", max_length=40, max_images=5), tok, spec, ModelSpec(image_id, tpi)
    )
    record = clip_record(CONFIG, "train", 2, 5)
    example = encoder(record)
    t = CONFIG.num_frames
    positions = np.flatnonzero(example["tokens"] == image_id)
    # T blocks right after "USER :", back to back (the spaces between placeholders are no tokens)
    assert len(positions) == t * tpi and (np.diff(positions) == 1).all()
    for k, frame in enumerate(make_clip(CONFIG, "train", 2)["frames"]):
        np.testing.assert_array_equal(example["images"][k], spec(frame))
    assert not example["images"][t:].any()  # the unused slot is a zero image
    answer = tok.decode(example["targets"][example["loss_mask"] > 0], skip_special_tokens=True)
    assert answer == record["turns"][1][1]


def test_too_few_image_slots_is_a_config_error():
    sys.path.insert(0, ROOT)
    from configs import llava

    config = llava.get_config("tiny_video")
    from_config_dict(config)  # the preset itself is fine
    config.stages.instruct.data.max_images = 2
    with pytest.raises(ConfigError, match=r"stages\.instruct\.data\.max_images=2: task 'video' needs"):
        from_config_dict(config)
    config.stages.instruct.data.max_images = 3
    config.synthetic.num_frames = 3
    from_config_dict(config)
    with pytest.raises(ValueError, match="needs max_images >= num_frames"):
        SyntheticSource(CONFIG, task="video", max_images=2)
