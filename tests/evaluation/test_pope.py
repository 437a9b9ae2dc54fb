"""POPE's scorer against the official script's logic (reference_pope_eval.py)."""

import random

import pytest
import reference_pope_eval

from mllm_jax.evaluation import pope

# the answer parsing's tricky cases: (generated text, how the official script reads it)
TRICKY = [
    ("Yes", "yes"),
    ("No", "no"),
    ("no", "no"),
    ("No, there is no dog.", "no"),
    ("No.", "no"),
    ("NO", "yes"),  # only "No", "no" and "not" count
    ("Nope", "yes"),
    ("There is not a dog in the image.", "no"),
    ("Yes. There is no cat though.", "yes"),  # only the first sentence
    ("Yes, there is a dog", "yes"),
    ("no!", "yes"),  # "no!" is not the word "no"
    ("I do not see one", "no"),
    ("", "yes"),
    ("yes\nno", "yes"),  # split on spaces only: "yes\nno" is one word
    ("cannot", "yes"),
    ("not,", "no"),  # commas are dropped first
]


def test_answer_parsing_tricky_cases():
    assert [pope.pope_answer(t) for t, _ in TRICKY] == [want for _, want in TRICKY]


def test_metrics_equal_the_official_script():
    rng = random.Random(0)
    texts = [t for t, _ in TRICKY] + ["yes", "no", "Yes, it is.", "There is no such object."]
    for trial in range(30):
        n = rng.randint(4, 40)
        preds = [rng.choice(texts) for _ in range(n)]
        labels = [rng.choice(pope.POPE_LABELS) for _ in range(n)]
        try:
            want = reference_pope_eval.eval_pope(preds, labels)
        except ZeroDivisionError:
            continue
        assert pope.pope_metrics(preds, labels) == pytest.approx(want, abs=1e-12), trial


def test_metrics_hand_computed_and_zero_divisions():
    # TP=2 (yes/yes), FP=1, TN=1, FN=1
    got = pope.pope_metrics(["Yes", "yes", "Yes", "No", "no"], ["yes", "yes", "no", "no", "yes"])
    assert got == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5}
    )
    # never "yes": the official script divides by zero; we report 0
    got = pope.pope_metrics(["no", "No"], ["yes", "no"])
    assert got == pytest.approx({"accuracy": 0.5, "precision": 0, "recall": 0, "f1": 0, "yes_ratio": 0})
    with pytest.raises(ValueError, match="labels must be"):
        pope.pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="as many"):
        pope.pope_metrics(["yes"], [])
