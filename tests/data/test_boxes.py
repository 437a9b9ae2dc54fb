"""PaliGemma-style location tokens: order, quantisation, parsing and the HF tokenizer round trip."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from mllm_jax.data import boxes
from mllm_jax.data.tokenizer import build_tokenizer


def test_token_order_is_y_first_and_bins_round():
    # 100 wide x 200 high: y0=50/200 -> round(255.75)=256, x0=0, y1=100/200 -> round(511.5)=512
    # (half to even), x1=100/100 -> 1023
    assert (
        boxes.box_to_tokens([0, 50, 100, 100], width=100, height=200)
        == "<loc0256><loc0000><loc0512><loc1023>"
    )
    # outside the image: clipped to the border bins
    assert boxes.box_to_tokens([-5, -5, 500, 500], 100, 100) == "<loc0000><loc0000><loc1023><loc1023>"


def test_round_trip_error_is_within_one_bin():
    rng = np.random.default_rng(0)
    for _ in range(500):
        width, height = rng.uniform(1, 2000, size=2)
        x0, x1 = np.sort(rng.uniform(0, width, size=2))
        y0, y1 = np.sort(rng.uniform(0, height, size=2))
        box = boxes.tokens_to_box(boxes.box_to_tokens([x0, y0, x1, y1], width, height), width, height)
        bin_size = np.array([width, height, width, height]) / (boxes.NUM_BINS - 1)
        # rounding to the nearest bin: at most half a bin off (one bin is the acceptance bound)
        assert np.all(np.abs(np.array(box) - [x0, y0, x1, y1]) <= 0.5 * bin_size + 1e-9)


def test_tokens_to_box_finds_the_box_in_text():
    text = "circle: <loc0256> <loc0000><loc0512>  <loc1023> ; square <loc0001><loc0001><loc0002><loc0002>"
    assert boxes.tokens_to_box(text, 1023, 2046) == [0.0, 512.0, 1023.0, 1024.0]  # the first box
    assert boxes.tokens_to_box("no box here", 10, 10) is None
    assert boxes.tokens_to_box("<loc0001><loc0002><loc0003>", 10, 10) is None  # only three
    assert boxes.tokens_to_box("<loc0500><loc0000><loc0100><loc0010>", 10, 10) is None  # y1 < y0
    assert boxes.tokens_to_box("<loc0000><loc0000><loc2000><loc0010>", 10, 10) is None  # no such bin


def test_bad_boxes_and_sizes_are_refused():
    with pytest.raises(ValueError, match="4 finite numbers"):
        boxes.box_to_tokens([0, 0, 1], 10, 10)
    with pytest.raises(ValueError, match="x0 <= x1"):
        boxes.box_to_tokens([5, 0, 1, 1], 10, 10)
    with pytest.raises(ValueError, match="must be positive"):
        boxes.box_to_tokens([0, 0, 1, 1], 0, 10)


def test_add_location_tokens_to_a_hf_tokenizer(tmp_path):
    tok = build_tokenizer("where is the red circle ?".split())
    before = len(tok)
    assert boxes.add_location_tokens(tok) == boxes.NUM_BINS and len(tok) == before + boxes.NUM_BINS
    assert boxes.add_location_tokens(tok) == 0  # idempotent
    ids = tok.convert_tokens_to_ids(list(boxes.LOCATION_TOKENS))
    assert ids == list(range(ids[0], ids[0] + boxes.NUM_BINS))  # consecutive, in bin order

    box_text = boxes.box_to_tokens([10, 20, 60, 80], 100, 100)
    encoded = tok(f"the red circle {box_text}")["input_ids"]
    assert encoded[-4:] == tok.convert_tokens_to_ids([box_text[i : i + 9] for i in range(0, 36, 9)])
    decoded = tok.decode(encoded, skip_special_tokens=True)  # location tokens survive skip_special_tokens
    assert boxes.tokens_to_box(decoded, 100, 100) == pytest.approx([10, 20, 60, 80], abs=0.05)

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(f"the red circle {box_text}")["input_ids"] == encoded
