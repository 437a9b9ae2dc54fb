"""Training's end-of-stage evaluation: which evaluators ``config.eval`` selects and how they decode; and
the synthetic VQA loop (blank images, few-shot supports) around a fake generate."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from mllm_jax import schema
from mllm_jax.data.fewshot import heldout_questions
from mllm_jax.data.layouts import ModelSpec
from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.evaluation import retrieval, stage, synthetic_grounding, synthetic_video, synthetic_vqa
from mllm_jax.evaluation.decoder import Decoder, pad_rows
from mllm_jax.inference import generate
from mllm_jax.training.runconfig import EvalConfig

CONFIG = SyntheticConfig()
SPEC = ImageSpec(32, mode="resize")
TPI = 4


def _stage(name="instruct", loss="lm", template="tiny", text_length=0):
    return types.SimpleNamespace(
        name=name, loss=loss, data=types.SimpleNamespace(template=template, text_length=text_length)
    )


@pytest.fixture
def calls(monkeypatch):
    """Each evaluator replaced by a recorder of what it was asked: ``[(name, decoder or args, n, ...)]``."""
    seen = []

    def recorder(name):
        def record(*args, **kwargs):
            seen.append((name, args, kwargs))
            return {f"eval/{name}": 1.0}

        return record

    monkeypatch.setattr(synthetic_grounding, "grounding_metrics", recorder("grounding"))
    monkeypatch.setattr(synthetic_video, "motion_metrics", recorder("video"))
    monkeypatch.setattr(synthetic_vqa, "vqa_metrics", recorder("vqa"))
    monkeypatch.setattr(retrieval, "synthetic_retrieval", recorder("retrieval"))
    return seen


def evaluate(ev, st=None, rules=None):
    ev = ev if isinstance(ev, EvalConfig) else schema.from_dict(EvalConfig, ev, "config.eval.")
    return stage.evaluate_stage(
        "model", "params", "tok", "image_spec", "model_spec", CONFIG, ev, st or _stage(), rules=rules
    )


def test_a_generative_stage_runs_grounding_video_then_vqa(calls):
    ev = dict(
        num_grounding=5,
        num_clips=6,
        num_questions=7,
        batch_size=4,
        max_new_tokens=2,
        types=["count"],
        shots=[0, 2],
    )
    rows = evaluate(ev, rules=("rules",))
    assert list(rows) == ["eval/grounding", "eval/video", "eval/vqa"]
    (_, (g, g_config, g_n), _), (_, (v, v_config, v_n), _), (_, (q, *q_args), _) = calls
    assert (g_n, v_n, q_args) == (5, 6, [CONFIG, 7, ("count",), (0, 2)])
    assert g_config is v_config is CONFIG
    assert (g.model, g.params, g.tokenizer, g.image_spec, g.model_spec) == (
        "model",
        "params",
        "tok",
        "image_spec",
        "model_spec",
    )
    assert (g.template, g.batch_size, g.mesh, g.rules) == ("tiny", 4, None, ("rules",))
    # boxes take their own token budget; the one-word answers the run's
    assert (g.max_new_tokens, v.max_new_tokens, q.max_new_tokens) == (
        synthetic_grounding.MAX_NEW_TOKENS,
        2,
        2,
    )
    assert v == q


def test_defaults_and_what_turns_it_off(calls):
    assert evaluate({"num_questions": 3}) == {"eval/vqa": 1.0}
    (_, (q, _, n, types_, shots), _) = calls[0]
    assert (n, q.batch_size, q.max_new_tokens, types_, shots) == (3, 128, 3, synthetic_vqa.HEADLINE_TYPES, ())
    calls.clear()
    assert evaluate({"num_questions": 3, "stages": ("align",)}) == {}  # another stage's
    assert evaluate({"num_questions": 3}, _stage(template="unknown")) == {}  # no template to ask in
    assert evaluate({"num_questions": 0}) == {}
    assert calls == []
    assert evaluate({"num_questions": 3, "template": "tiny"}, _stage(template="unknown")) == {"eval/vqa": 1.0}


def test_the_runs_eval_config_is_read_as_it_is(calls):
    ev = EvalConfig(num_questions=3, batch_size=2, max_new_tokens=4, shots=(0,), types=("count",))
    assert evaluate(ev) == {"eval/vqa": 1.0}
    (_, (q, _, n, types_, shots), _) = calls[0]
    assert (n, q.batch_size, q.max_new_tokens, q.template, types_, shots) == (
        3,
        2,
        4,
        "tiny",
        ("count",),
        (0,),
    )
    assert evaluate(dataclasses.replace(ev, stages=("align",))) == {}


def test_a_qformer_stage_scores_retrieval_only(calls):
    st = _stage(loss="qformer", text_length=12)
    assert evaluate({"num_questions": 3}, st) == {}
    assert evaluate({"num_questions": 3, "num_retrieval": 9}, st) == {"eval/retrieval": 1.0}
    [(name, args, kwargs)] = calls
    assert args == ("model", "params", "tok", "image_spec", CONFIG)
    assert (name, kwargs) == ("retrieval", {"num_images": 9, "text_length": 12})


def test_pad_rows_copies_the_last_row():
    prompts, pixels, kwargs = pad_rows(3, [[1], [2, 3]], np.arange(2.0)[:, None], {"m": np.eye(2)})
    assert prompts == [[1], [2, 3], [2, 3]]
    assert pixels[:, 0].tolist() == [0, 1, 1] and kwargs["m"].tolist() == [[1, 0], [0, 1], [0, 1]]
    prompts, pixels, _ = pad_rows(2, [[1], [2]], None, {})
    assert (prompts, pixels) == ([[1], [2]], None)


def test_vqa_loop_blank_images_and_few_shot(monkeypatch):
    tok = build_tokenizer(vocabulary(CONFIG))
    image_id = tok.convert_tokens_to_ids("<image>")
    blank = SPEC(np.zeros((32, 32, 3), np.uint8))
    calls = []

    def fake_generate(
        model, params, prompts, pixels, *, max_new_tokens, eos_ids, pad_id, embed_kwargs, mesh, rules
    ):
        shots = pixels.shape[1] - 1
        calls.append((len(prompts), shots, bool((pixels[:, -1] == blank).all())))
        for prompt in prompts:  # one image block per support and one for the question
            assert prompt.count(image_id) == (shots + 1) * TPI
        return [(tok.encode("red", add_special_tokens=False) + [tok.eos_token_id], []) for _ in prompts]

    monkeypatch.setattr(generate, "generate", fake_generate)
    decoder = Decoder(None, None, tok, SPEC, ModelSpec(image_id, TPI), "tiny", batch_size=4)
    rows = synthetic_vqa.vqa_metrics(decoder, CONFIG, 6, shots=(0, 2))
    # 6 questions in chunks of 4 (the second padded): the images, blank images, then 2-shot
    assert calls == [(4, 0, False)] * 2 + [(4, 0, True)] * 2 + [(4, 2, False)] * 2
    items = heldout_questions(CONFIG, 6)
    red = [it["answer"] == "red" for it in items]
    headline = [r for r, it in zip(red, items, strict=True) if it["type"] in synthetic_vqa.HEADLINE_TYPES]
    for suffix in ("", "_blank", "_2shot"):
        assert rows[f"eval/vqa_accuracy{suffix}"] == pytest.approx(np.mean(headline))
    assert rows["eval/vqa_accuracy_0shot"] == rows["eval/vqa_accuracy"]

    rows_again, lines = synthetic_vqa.predictions(decoder, CONFIG, 6)
    assert {k: rows[k] for k in rows_again} == rows_again
    assert [line["prediction"] for line in lines] == ["red"] * 6
    assert lines[0]["prompt"] == f"USER : <image> {items[0]['question']} ASSISTANT :"
