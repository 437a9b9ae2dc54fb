"""Grounding / referring accuracy: scoring of known answers, and the eval loop around a fake generate."""

from __future__ import annotations

import chex
import pytest

from mllm_jax.data import boxes
from mllm_jax.data import grounding as data
from mllm_jax.data.layouts import IMAGE, ModelSpec
from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.evaluation import metrics
from mllm_jax.evaluation import synthetic_grounding as grounding
from mllm_jax.evaluation.decoder import Decoder
from mllm_jax.inference import generate

CONFIG = SyntheticConfig()
SIZE = CONFIG.image_size


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer(vocabulary(CONFIG))
    boxes.add_location_tokens(tok)
    return tok


def test_grounding_rows_on_known_answers():
    items = data.heldout_items(CONFIG, "grounding", 4)
    x0, y0, x1, y1 = items[1]["box"]
    part = boxes.box_to_tokens([x0, y0, x0 + 0.6 * (x1 - x0), y1], SIZE, SIZE)  # IoU 0.6: a hit
    texts = [items[0]["answer"], part, "<loc0000><loc0000><loc0001><loc0001>", "red circle"]
    rows = grounding.grounding_rows(texts, items, SIZE)
    assert rows["eval/grounding_accuracy"] == pytest.approx(0.5)
    assert rows["eval/grounding_parsed"] == pytest.approx(0.75)
    # the mean IoU counts the unparsed answer as 0; the exact answer is ~1 up to the 1024-bin rounding
    expected = [
        metrics.box_iou(boxes.tokens_to_box(t, SIZE, SIZE), it["box"])
        for t, it in zip(texts[:3], items[:3], strict=True)
    ]
    assert expected[0] > 0.98 and expected[1] == pytest.approx(0.6, abs=0.01) and expected[2] == 0
    assert rows["eval/grounding_mean_iou"] == pytest.approx(sum(expected) / 4)


def test_referring_needs_the_exact_name():
    items = data.heldout_items(CONFIG, "referring", 3)
    texts = [f" {items[0]['answer']} ", items[1]["answer"].split()[0], items[2]["answer"] + " circle"]
    assert grounding.referring_correct(texts, items) == [True, False, False]


def test_eval_loop_with_a_fake_generate(tokenizer, monkeypatch):
    """The prompts carry each item's image and question, padding rows are dropped, and the metrics are
    those of the generated answers: the fake model answers every other question right."""
    spec = ModelSpec(tokenizer.convert_tokens_to_ids(IMAGE), 4)
    image_spec = ImageSpec(size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, mode="resize")
    n, batch = 5, 2
    # generate is called per task (grounding first) for items [0, 1], [2, 3], [4 + a padding row]
    chunks = [
        items[i : i + batch]
        for task in data.ITEMS
        for items in [data.heldout_items(CONFIG, task, n)]
        for i in range(0, n, batch)
    ]
    calls = []

    def fake_generate(
        model, params, prompts, pixels, *, max_new_tokens, eos_ids, pad_id, embed_kwargs, mesh, rules
    ):
        assert mesh is None and rules is None and not embed_kwargs  # no mesh given: one device
        assert pixels.shape == (batch, 1, SIZE, SIZE, 3) and len(prompts) == batch
        assert max_new_tokens >= 5 and eos_ids == [tokenizer.eos_token_id]
        chunk = chunks[len(calls)]
        calls.append(len(calls))
        out = []
        for k, prompt in enumerate(prompts):
            item = chunk[min(k, len(chunk) - 1)]  # the padding row repeats the last item
            text = " ".join(tokenizer.decode(prompt, skip_special_tokens=True).split())
            assert text == f"USER : {item['question'].replace('><', '> <')} ASSISTANT :"
            chex.assert_trees_all_close(pixels[k, 0], image_spec(item["image"]))
            reply = item["answer"] if k % 2 == 0 else "<loc0000><loc0000><loc0000><loc0000>"
            out.append((tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id], []))
        return out

    monkeypatch.setattr(generate, "generate", fake_generate)
    decoder = Decoder(None, None, tokenizer, image_spec, spec, "tiny", batch, grounding.MAX_NEW_TOKENS)
    rows, per_task = grounding.grounding_answers(decoder, CONFIG, n)
    assert len(calls) == len(chunks) == 2 * 3
    # right answers at positions 0, 2 of each batch: items 0, 2, 4 of 5
    assert rows["eval/grounding_accuracy"] == pytest.approx(3 / 5)
    assert rows["eval/grounding_parsed"] == 1.0
    assert rows["eval/referring_accuracy"] == pytest.approx(3 / 5)
    items, texts = per_task["grounding"]
    exact = [t == it["answer"].replace("><", "> <") for t, it in zip(texts, items, strict=True)]
    assert exact == [True, False, True, False, True]
    assert set(rows) == {
        "eval/grounding_accuracy",
        "eval/grounding_mean_iou",
        "eval/grounding_parsed",
        "eval/referring_accuracy",
    }
    calls.clear()  # the metrics-only entry point runs the same loop
    assert grounding.grounding_metrics(decoder, CONFIG, n) == rows


def test_a_tokenizer_without_location_tokens_is_refused():
    tok = build_tokenizer(vocabulary(CONFIG))
    spec = ModelSpec(tok.convert_tokens_to_ids(IMAGE), 4)
    image_spec = ImageSpec(size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, mode="resize")
    decoder = Decoder(None, None, tok, image_spec, spec, "tiny", batch_size=2)
    with pytest.raises(ValueError, match="location tokens"):
        grounding.grounding_metrics(decoder, CONFIG, 2)
