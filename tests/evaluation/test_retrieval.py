"""retrieval_recall on hand-made embeddings: max over queries, duplicate captions, k, chance, errors."""

import numpy as np
import pytest

from mllm_jax.evaluation.retrieval import balanced_negatives, rerank, retrieval_recall, top_k

E = np.eye(3, dtype=np.float32)


def test_scores_take_the_max_over_queries():
    # image 0 has queries e0, e1. Text 0 = e0 scores 1 by max (0.5 by mean); text 1 = (e0 + e1)/sqrt2
    # scores 0.71 either way: only the max ranks text 0 first.
    images = np.stack([E[[0, 1]], E[[2, 2]]])
    texts = np.stack([E[0], (E[0] + E[1]) / np.sqrt(2), E[2]])
    out = retrieval_recall(images, texts, [0, 2], ks=(1, 2))
    assert out["r1"] == 1.0 and out["r2"] == 1.0
    out = retrieval_recall(images, texts, [1, 2], ks=(1, 2))  # image 0's truth is now its second best
    assert out["r1"] == 0.5 and out["r2"] == 1.0


def test_identical_texts_count_as_hits_and_set_the_chance():
    images = np.stack([E[[0, 0]], E[[1, 1]], E[[2, 2]]])
    # image 0's own caption is text 0, but text 1 (the same caption) scores higher
    texts = np.stack([0.5 * E[0] + 0.5 * E[2], E[0], E[1] + 0.1 * E[2], E[2]])
    keys = ["a red circle", "a red circle", "a blue square", "a green star"]
    gt = [0, 2, 3]
    assert retrieval_recall(images, texts, gt, ks=(1,))["r1"] == pytest.approx(2 / 3)  # texts all distinct
    out = retrieval_recall(images, texts, gt, ks=(1, 5), text_keys=keys)
    assert out["r1"] == 1.0
    assert out["r5"] == 1.0  # k beyond M means every text
    assert out["r1_chance"] == pytest.approx(np.mean([2 / 4, 1 / 4, 1 / 4]))


def test_several_ground_truths_per_image():
    images = np.stack([E[[0, 0]], np.stack([E[1], 0.5 * E[0]])])
    texts = np.stack([E[0], E[1], E[2]])  # image 1 ranks text 1, text 0, then its truth text 2
    out = retrieval_recall(images, texts, np.array([[2, 0], [2, -1]]), ks=(1, 2))
    assert out["r1"] == 0.5 and out["r2"] == 0.5
    assert out["r1_chance"] == pytest.approx(np.mean([2 / 3, 1 / 3]))


def test_bad_inputs_are_refused():
    images, texts = np.zeros((2, 2, 3)), np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"\[N, Q, E\]"):
        retrieval_recall(images[0], texts, [0, 1])
    with pytest.raises(ValueError, match="ground-truth"):
        retrieval_recall(images, texts, [0, 3])
    with pytest.raises(ValueError, match="gt_text_of_image"):
        retrieval_recall(images, texts, [0])
    with pytest.raises(ValueError, match="text_keys"):
        retrieval_recall(images, texts, [0, 1], text_keys=["a", "b"])


def test_itm_rerank_reorders_the_top_k_only():
    # image 0: ITC ranks texts 1, 0, 2, 3; ITM raises text 0 (its truth) above 1 within the top 2
    scores = np.array([[0.5, 0.6, 0.4, 0.1], [0.1, 0.2, 0.3, 0.9]])
    candidates = top_k(scores, 2)
    np.testing.assert_array_equal(candidates, [[1, 0], [3, 2]])
    itm = np.array([[-3.0, 2.0], [0.0, 5.0]])  # text 1: 0.6 - 3; text 0: 0.5 + 2; image 1: text 2 wins
    reranked = rerank(scores, candidates, itm)
    np.testing.assert_array_equal(np.argsort(-reranked, axis=1), [[0, 1, 2, 3], [2, 3, 1, 0]])
    images, texts = np.zeros((2, 1, 3)), np.zeros((4, 3))
    assert retrieval_recall(images, texts, [0, 3], ks=(1,), scores_NxM=scores)["r1"] == 0.5
    out = retrieval_recall(images, texts, [0, 3], ks=(1, 2), scores_NxM=reranked)
    assert out["r1"] == 0.5 and out["r2"] == 1.0  # image 0 now right, image 1's truth second
    # a candidate with a very low ITM logit still ranks above every non-candidate
    low = rerank(scores, candidates, np.full((2, 2), -100.0))
    assert set(np.argsort(-low, axis=1)[0, :2]) == {0, 1}
    with pytest.raises(ValueError, match="scores"):
        retrieval_recall(images, texts, [0, 3], scores_NxM=scores[:, :3])


def test_balanced_negatives_differ_and_are_reproducible():
    captions = ["a", "b", "a", "c", "b", "a"]
    neg = balanced_negatives(captions, seed=0)
    assert all(captions[j] != captions[i] for i, j in enumerate(neg))
    np.testing.assert_array_equal(neg, balanced_negatives(captions, seed=0))
    assert len(set(balanced_negatives(captions * 20, seed=1))) > 5  # drawn, not always the same one
    np.testing.assert_array_equal(balanced_negatives(["x", "x"]), [-1, -1])  # nothing differs
