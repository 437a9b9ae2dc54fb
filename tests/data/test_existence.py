"""Existence questions on the built-in scenes (data/existence.py): POPE's three negative kinds, the
``existence`` task and the synthetic preference pairs whose rejected answers name what is not there."""

import collections

import numpy as np
import pytest

from mllm_jax.data import existence, synthetic
from mllm_jax.data.sources import SyntheticSource

CONFIG = synthetic.SyntheticConfig(existence_questions=True)


def _objects_of(item_or_record, split="heldout", index=None):
    return {(o["color"], o["shape"]) for o in synthetic.make_example(CONFIG, split, index)["objects"]}


def _asked(question):
    words = question.split()  # "is there a {color} {shape} in the image ?"
    return words[3], words[4]


def test_vocabulary_has_the_existence_words_only_when_asked():
    plain, with_words = synthetic.vocabulary(synthetic.SyntheticConfig()), synthetic.vocabulary(CONFIG)
    assert not {"yes", "no", "image", "in"} & set(plain)
    assert set(with_words) - set(plain) == {"yes", "no", "image", "in"}


def test_pope_items_balance_kinds_and_answers_and_share_their_positives():
    items = existence.pope_items(CONFIG, 60)
    counts = collections.Counter((it["type"], it["answer"]) for it in items)
    assert counts == {(k, a): 10 for k in existence.NEGATIVE_TYPES for a in ("yes", "no")}
    by_kind = {k: [it for it in items if it["type"] == k] for k in existence.NEGATIVE_TYPES}
    for i in range(20):
        there = _objects_of(None, "heldout", i)
        for kind, kind_items in by_kind.items():
            item = kind_items[i]
            asked = _asked(item["question"])
            assert (asked in there) == (item["answer"] == "yes"), (kind, i)
            if kind == "adversarial" and item["answer"] == "no":  # shares a colour or a shape
                assert any(asked[0] == c or asked[1] == s for c, s in there)
        # the same image and the same positive question in all three settings, as POPE
        if i % 2 == 0:
            assert len({by_kind[k][i]["question"] for k in existence.NEGATIVE_TYPES}) == 1


def test_popular_negatives_are_the_most_frequent_absent_pairs():
    counts = existence.popularity(CONFIG)
    assert sum(counts.values()) > existence.POPULAR_SCENES  # 1-3 objects a scene
    rng = np.random.default_rng(0)
    objects = synthetic.make_example(CONFIG, "heldout", 3)["objects"]
    pick = existence.negative(CONFIG, objects, "popular", rng)
    absent = existence.absent_pairs(CONFIG, objects)
    assert pick in absent and counts[pick] == max(counts[p] for p in absent)
    with pytest.raises(ValueError, match="negative kind"):
        existence.negative(CONFIG, objects, "rare", rng)


def test_preference_pairs_reject_answers_naming_what_is_absent():
    source = SyntheticSource(CONFIG, "train", "preference", size=400)
    kinds = collections.Counter()
    for i in range(len(source)):
        r = source[i]
        image_objects = [o for o in synthetic.make_example(CONFIG, "train", i)["objects"]]
        colors = {o["color"] for o in image_objects}
        shapes = {o["shape"] for o in image_objects}
        question = r["turns"][-1][1]
        assert r["chosen"] != r["rejected"] and len(r["images"]) == 1
        if question.startswith("<image> what color"):
            kinds["color"] += 1
            assert r["rejected"] in CONFIG.colors and r["rejected"] not in colors
        elif question.startswith("<image> what shape"):
            kinds["shape"] += 1
            assert r["rejected"] in CONFIG.shapes and r["rejected"] not in shapes
        elif question == "<image>":
            kinds["caption"] += 1
            assert r["chosen"] == synthetic.caption(image_objects)
            wrong = set(r["rejected"].split()) - set(r["chosen"].split())
            assert wrong and wrong <= (set(CONFIG.colors) - colors) | (set(CONFIG.shapes) - shapes)
        else:
            kinds["existence"] += 1
            assert {r["chosen"], r["rejected"]} == {"yes", "no"}
    assert min(kinds.values()) > 40, kinds


def test_existence_task_answers_yes_and_no_in_turn():
    source = SyntheticSource(CONFIG, "train", "existence", size=10)
    answers = [source[i]["turns"][-1][1] for i in range(10)]
    assert answers == ["yes", "no"] * 5
