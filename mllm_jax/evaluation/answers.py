"""Answer processing shared by the open-ended benchmarks: the EvalAI / MMF answer processor (TextVQA,
VizWiz submissions) and TextVQA's accuracy (MMF's ``TextVQAAccuracyEvaluator``, as LLaVA's
``m4c_evaluator.py`` runs it). Both build on the VQAv2 normaliser of ``metrics.py``."""

from __future__ import annotations

from collections.abc import Sequence

from mllm_jax.evaluation import metrics


def evalai_answer(text: str) -> str:
    """MMF's ``EvalAIAnswerProcessor``: lowercase, drop ``,`` and ``?``, split ``'s`` off, then the VQAv2
    normalisation (punctuation, number words, articles, contractions), applied whatever the humans said."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return metrics.normalize_answer(text)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one prediction: both sides through ``evalai_answer``; the score of an answer is
    the mean over the leave-one-out subsets of the humans of ``min(1, matches / 3)``."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    gts = [evalai_answer(a) for a in answers]
    pred = evalai_answer(prediction)
    if pred not in gts:
        return 0.0
    matches = gts.count(pred)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)
