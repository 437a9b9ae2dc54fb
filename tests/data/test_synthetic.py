"""The built-in synthetic dataset: determinism, split hygiene and answer correctness."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_jax.data.synthetic import (
    COLOR_RGB,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SyntheticConfig,
    make_example,
    vocabulary,
)

CONFIG = SyntheticConfig()


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return [make_example(CONFIG, "train", i) for i in range(200)] + [
        make_example(CONFIG, "heldout", i) for i in range(50)
    ]


def _find(objects: list[dict], words: list[str]) -> dict:
    (obj,) = [o for o in objects if [o["color"], o["shape"]] == words]
    return obj


def test_deterministic():
    for split in ("train", "heldout"):
        a, b = make_example(CONFIG, split, 7), make_example(CONFIG, split, 7)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert all(a[k] == b[k] for k in ("objects", "caption", "questions"))


def test_seed_changes_stream():
    other = SyntheticConfig(seed=1)
    assert any(
        make_example(CONFIG, "train", i)["caption"] != make_example(other, "train", i)["caption"]
        for i in range(5)
    )


def test_splits_are_disjoint():
    train = {make_example(CONFIG, "train", i)["image"].tobytes() for i in range(300)}
    heldout = {make_example(CONFIG, "heldout", i)["image"].tobytes() for i in range(100)}
    assert len(heldout) > 20  # the heldout split is not a handful of repeated images
    assert not train & heldout


def test_image_format(examples):
    for ex in examples[:20]:
        img = ex["image"]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    img = make_example(SyntheticConfig(image_size=48), "train", 0)["image"]
    assert img.shape == (48, 48, 3)


def test_objects_are_drawn_and_separate(examples):
    for ex in examples:
        objs, img = ex["objects"], ex["image"]
        assert CONFIG.min_shapes <= len(objs) <= CONFIG.max_shapes
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        covered = np.zeros(img.shape[:2], bool)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert x1 - x0 >= 0.25 * CONFIG.image_size  # large shapes: easy to see at low resolution
            assert not covered[y0:y1, x0:x1].any()  # no overlap
            covered[y0:y1, x0:x1] = True
            assert x0 <= o["cx"] <= x1 and y0 <= o["cy"] <= y1
            assert (img[int(o["cy"]), int(o["cx"])] == COLOR_RGB[o["color"]]).all()
        assert (img[~covered] == CONFIG.background).all()
        # Reading order: the caption (and objects) are a function of the image alone.
        assert [(o["cy"], o["cx"]) for o in objs] == sorted((o["cy"], o["cx"]) for o in objs)


def test_caption_lists_objects(examples):
    ex = examples[0]
    expected = [f"a {o['color']} {o['shape']}" for o in ex["objects"]]
    text = ex["caption"].replace(" , ", " | ").replace(" and ", " | ").removesuffix(" .")
    assert text.split(" | ") == expected


def test_answers_match_objects(examples):
    seen = set()
    for ex in examples:
        objs = ex["objects"]
        types = [q["type"] for q in ex["questions"]]
        assert types[0] == "count" and len(set(types)) == len(types)
        for q in ex["questions"]:
            seen.add(q["type"])
            words = q["question"].split()
            assert len(q["answer"].split()) == 1
            if q["type"] == "count":
                assert q["answer"] == NUMBER_WORDS[len(objs)]
            elif q["type"] == "color":
                shape = words[words.index("the") + 1]
                matches = [o for o in objs if o["shape"] == shape]
                assert len(matches) == 1 and q["answer"] == matches[0]["color"]
            elif q["type"] == "shape":
                color = words[words.index("the") + 1]
                matches = [o for o in objs if o["color"] == color]
                assert len(matches) == 1 and q["answer"] == matches[0]["shape"]
            else:
                # "is the C S left or right of the C S ?"
                a, b = _find(objs, words[2:4]), _find(objs, words[-3:-1])
                assert abs(a["cx"] - b["cx"]) > 0
                assert q["answer"] == ("left" if a["cx"] < b["cx"] else "right")
    assert seen == set(QUESTION_TYPES)


def test_vocabulary_covers_all_text(examples):
    vocab = vocabulary(CONFIG)
    assert vocab == sorted(set(vocab)) == vocabulary(SyntheticConfig())
    assert {"USER", "ASSISTANT", ":", "?", ".", ","} <= set(vocab)
    for ex in examples:
        texts = [ex["caption"]] + [t for q in ex["questions"] for t in (q["question"], q["answer"])]
        for text in texts:
            assert set(text.split()) <= set(vocab), text


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_example(CONFIG, "test", 0)
    with pytest.raises(ValueError):
        SyntheticConfig(colors=("chartreuse",))
