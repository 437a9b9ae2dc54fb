"""Synthetic POPE (evaluation/synthetic_pope.py): the questions each decoder is asked, and the rows the
official scorer gives for an oracle, an always-yes model and one that hallucinates only adversarially."""

import dataclasses

import numpy as np

from mllm_jax.data import synthetic
from mllm_jax.evaluation import synthetic_pope
from mllm_jax.evaluation.tasks import TASKS

CONFIG = synthetic.SyntheticConfig(existence_questions=True)


@dataclasses.dataclass(frozen=True)
class FakeDecoder:
    """Answers each question with ``policy(item)`` and records what it was asked (as Decoder.answer)."""

    policy: object
    asked: list
    max_new_tokens: int = 3

    def image_spec(self, image):
        return image.astype(np.float32) / 255.0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def answer(self, items, turns, pixels, reply):
        out = []
        for it in items:
            self.asked.append((turns(it), pixels(it).shape, self.max_new_tokens))
            out.append(reply(self.policy(it)))
        return out


def test_an_oracle_scores_one_and_always_yes_scores_half():
    asked = []
    oracle = FakeDecoder(lambda it: "Yes, there is." if it["answer"] == "yes" else "No there is not.", asked)
    rows = synthetic_pope.pope_rows(oracle, CONFIG, 30)
    assert rows["eval/pope_accuracy"] == rows["eval/pope_f1"] == 1.0 and rows["eval/pope_yes_ratio"] == 0.5
    assert len(asked) == 30 and asked[0][1] == (1, 32, 32, 3) and asked[0][2] == synthetic_pope.MAX_NEW_TOKENS
    assert asked[0][0][-1][1].startswith("<image> is there a ")
    rows = synthetic_pope.pope_rows(FakeDecoder(lambda it: "yes", []), CONFIG, 30)
    assert rows["eval/pope_accuracy"] == 0.5 and rows["eval/pope_yes_ratio"] == 1.0
    assert rows["eval/pope_f1"] == 2 * 0.5 / 1.5


def test_per_kind_rows_single_out_adversarial_hallucination():
    def fooled(it):  # right, except "yes" to every adversarial negative
        return "yes" if it["type"] == "adversarial" else it["answer"]

    rows = synthetic_pope.pope_rows(FakeDecoder(fooled, []), CONFIG, 60)
    assert rows["eval/pope_accuracy/random"] == rows["eval/pope_accuracy/popular"] == 1.0
    assert rows["eval/pope_accuracy/adversarial"] == 0.5 and rows["eval/pope_yes_ratio/adversarial"] == 1.0
    assert rows["eval/pope_precision/adversarial"] == 0.5 and rows["eval/pope_recall/adversarial"] == 1.0
    np.testing.assert_allclose(rows["eval/pope_accuracy"], 2.5 / 3)


def test_evaluate_knows_the_task_and_writes_prediction_lines():
    task = TASKS["synthetic_pope"]
    assert task.max_new_tokens == synthetic_pope.MAX_NEW_TOKENS
    rows, lines = synthetic_pope.predictions(FakeDecoder(lambda it: "no", []), CONFIG, 6)
    assert rows["eval/pope_accuracy"] == 0.5 and len(lines) == 6
    assert {line["type"] for line in lines} == {"random", "popular", "adversarial"}
    assert all(line["prediction"] == "no" and line["answers"][0] in ("yes", "no") for line in lines)
