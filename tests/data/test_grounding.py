"""Synthetic grounding / referring records: the boxes are right, the names match, splits stay apart."""

from __future__ import annotations

import re

import chex
import numpy as np
import pytest

from mllm_jax import errors
from mllm_jax.data import boxes, grounding, templates
from mllm_jax.data.config import DataConfig
from mllm_jax.data.layouts import IMAGE, ModelSpec
from mllm_jax.data.sources import SyntheticSource
from mllm_jax.data.synthetic import SyntheticConfig, make_example, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.evaluation.metrics import box_iou

CONFIG = SyntheticConfig()
SIZE = CONFIG.image_size


def _name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_grounding_answer_is_the_named_objects_box(split):
    for i in range(60):
        item = grounding.grounding_item(CONFIG, split, i)
        ex = make_example(CONFIG, split, i)
        chex.assert_trees_all_equal(item["image"], ex["image"])
        (obj,) = [o for o in ex["objects"] if f"where is the {_name(o)} ?" == item["question"]]
        decoded = boxes.tokens_to_box(item["answer"], SIZE, SIZE)
        assert box_iou(decoded, obj["box"]) >= 0.9, (item, obj)
        assert len(boxes._BOX_PATTERN.findall(item["answer"])) == 1 and item["answer"].startswith("<loc")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_referring_answer_names_the_object_at_the_box(split):
    for i in range(60):
        item = grounding.referring_item(CONFIG, split, i)
        ex = make_example(CONFIG, split, i)
        asked = boxes.tokens_to_box(item["question"], SIZE, SIZE)
        # the object whose box the question names, by overlap: it is the one the answer names
        best = max(ex["objects"], key=lambda o: box_iou(asked, o["box"]))
        assert box_iou(asked, best["box"]) >= 0.9
        assert item["answer"] == _name(best)
        assert item["question"].startswith("what is at <loc") and item["question"].endswith(" ?")


def test_objects_are_drawn_from_the_whole_image():
    # the asked-about object is not always the first one: every position in a 3-object image comes up
    picked = set()
    for i in range(200):
        item = grounding.grounding_item(CONFIG, "train", i)
        objects = make_example(CONFIG, "train", i)["objects"]
        if len(objects) == 3:
            picked.add([_name(o) for o in objects].index(item["name"]))
    assert picked == {0, 1, 2}


def test_heldout_items_never_show_a_training_image():
    train = {make_example(CONFIG, "train", i)["image"].tobytes() for i in range(3000)}
    for task in grounding.ITEMS:
        items = grounding.heldout_items(CONFIG, task, 100)
        assert all(it["type"] == task for it in items)
        assert not any(it["image"].tobytes() in train for it in items)


def test_deterministic_per_config_split_index():
    for task, make in grounding.ITEMS.items():
        a, b = make(CONFIG, "train", 5), make(CONFIG, "train", 5)
        chex.assert_trees_all_equal(a, b)
        others = [make(CONFIG, "train", i) for i in range(6, 12)] + [
            make(SyntheticConfig(seed=1), "train", 5)
        ]
        assert any(o["question"] != a["question"] or o["answer"] != a["answer"] for o in others), task
    chex.assert_trees_all_equal(
        grounding.heldout_items(CONFIG, "referring", 4),
        [grounding.referring_item(CONFIG, "heldout", i) for i in range(4)],
    )
    with pytest.raises(ValueError, match="task must be one of"):
        grounding.heldout_items(CONFIG, "detect", 1)


def test_records_train_on_exactly_the_answer_tokens():
    """With location tokens added to the built-in tokenizer, a box is 4 tokens and only the answer
    (and EOS) is learned, in both directions."""
    tok = build_tokenizer(vocabulary(CONFIG))
    assert boxes.add_location_tokens(tok) == boxes.NUM_BINS
    spec = ModelSpec(tok.convert_tokens_to_ids(IMAGE), 4)
    for task in ("grounding", "referring"):
        assert DataConfig(mix=({"weight": 1.0, "task": task},)).components()[0][1].task == task
        record = SyntheticSource(CONFIG, "train", task, size=10)[3]
        item = grounding.ITEMS[task](CONFIG, "train", 3)
        assert record["turns"] == [("user", f"{IMAGE} {item['question']}"), ("assistant", item["answer"])]
        tokens, mask = templates.encode_conversation("tiny", tok, record["turns"], spec)[:2]
        learned = tok.convert_ids_to_tokens(np.asarray(tokens)[np.asarray(mask) > 0].tolist())
        assert tok.unk_token_id not in np.asarray(tokens).tolist()
        assert learned == tok.tokenize(item["answer"]) + [tok.eos_token]
        assert (
            len([t for t in tok.tokenize(item["question"] + " " + item["answer"]) if t.startswith("<loc")])
            == 4
        )


@pytest.mark.parametrize(
    "override, key",
    [
        ({"eval": {"num_grounding": 4}}, "config.eval.num_grounding"),
        ({"mix": ({"weight": 1.0, "task": "vqa"}, {"weight": 1.0, "task": "referring"})}, "mix[1].task"),
    ],
)
def test_boxes_without_location_tokens_are_a_config_error(override, key, tmp_path):
    from configs import llava
    from mllm_jax.training import runconfig, wiring

    c = llava.get_config("tiny_grounding").to_dict()
    c["model"]["location_tokens"] = False
    c["eval"].update(override.get("eval", {"num_grounding": 0}))
    c["stages"]["instruct"]["data"]["mix"] = override.get("mix", ())
    with pytest.raises(errors.ConfigError, match=re.escape(key) + " needs location tokens"):
        wiring.RunSetup(runconfig.from_config_dict(c), str(tmp_path))
    c["model"]["location_tokens"] = True  # the fix the message names
    run = wiring.RunSetup(runconfig.from_config_dict(c), str(tmp_path))
    assert run.config.llm.vocab_size == len(run.tokenizer) > boxes.NUM_BINS
