"""Beam search, as transformers' ``generate(num_beams=k, do_sample=False)`` does it (its vectorised
``_beam_search``: ``length_penalty``, ``early_stopping=False``'s stopping heuristic, one sequence
returned), so that the same prompt gives the same token ids.

The model runs on ``inference.steps.Rows`` (one row per beam: a prefill of the prompt copied to every
row, then one compiled step per token, rows reordered after each step); the bookkeeping over the
``k * V`` candidates is a few numpy ops on the host.
"""

from __future__ import annotations

import numpy as np

from mllm_jax.inference import steps
from mllm_jax.inference.generate import PROMPT_BUCKET, llm_config

NEG = np.float32(-1.0e9)  # transformers' "impossible" score


def _log_softmax(x_KxV):
    x = x_KxV.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


def _top(x, k: int):
    """Indices of the ``k`` largest entries, largest first (ties: the lower index first, as torch.topk)."""
    return np.argsort(-x, kind="stable")[:k]


def beam_search(
    model,
    params,
    prompt: list[int],
    images=None,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_ids,
    embed_kwargs=None,
    length_penalty: float = 1.0,
) -> tuple[list[int], float]:
    """The best of ``num_beams`` beams for one prompt: ``(generated ids, EOS included when produced;
    its score: the summed log-probabilities / length ** length_penalty)``."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    p = len(prompt)
    padded = -(-p // PROMPT_BUCKET) * PROMPT_BUCKET
    if padded + max_new_tokens > llm_config(model).max_positions:
        raise ValueError(
            f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{llm_config(model).max_positions} positions"
        )
    k, eos = num_beams, np.asarray(sorted(set(np.atleast_1d(eos_ids).tolist())), np.int64)
    keep = max(2, 1 + len(eos)) * k  # candidates kept per step, so k can go on even if some end
    rows = steps.Rows(model, params, k, padded + max_new_tokens)
    logits = np.asarray(rows.prefill(0, prompt, images, embed_kwargs))
    rows.reorder(np.zeros(k, np.int32))
    logits_KxV = np.broadcast_to(logits, (k, logits.shape[-1]))
    v = logits_KxV.shape[-1]

    running = np.full((k, max_new_tokens), -1, np.int64)
    running_scores = np.full(k, NEG, np.float32)
    running_scores[0] = 0  # the first step picks from one beam only
    done_seqs = np.full((k, max_new_tokens), -1, np.int64)
    done_scores, done_lens = np.full(k, NEG, np.float32), np.zeros(k, np.int64)
    finished = np.zeros(k, bool)
    improvable = True
    n = 0  # tokens generated so far
    while True:
        acc = (_log_softmax(np.asarray(logits_KxV)) + running_scores[:, None]).reshape(-1)
        top = _top(acc, keep)
        top_scores, beam, token = acc[top], top // v, top % v
        candidates = running[beam].copy()
        candidates[:, n] = token
        hits = np.isin(token, eos) | (n + 1 >= max_new_tokens)
        # the beams that go on: the best k candidates that did not just end
        go_on = top_scores + hits.astype(np.float32) * NEG
        nxt = _top(go_on, k)
        running, running_scores, parents = candidates[nxt], go_on[nxt], beam[nxt]
        # the finished hypotheses: the best k so far, among the top k candidates that just ended
        just = hits & (np.arange(keep) < k)
        scores = (top_scores / np.float32((n + 1) ** length_penalty)).astype(np.float32)
        scores = scores + np.float32(not improvable) * NEG + (~just).astype(np.float32) * NEG
        merged = _top(np.concatenate([done_scores, scores]), k)
        done_seqs = np.concatenate([done_seqs, candidates])[merged]
        done_scores = np.concatenate([done_scores, scores])[merged]
        done_lens = np.concatenate([done_lens, np.full(keep, n + 1)])[merged]
        finished = np.concatenate([finished, just])[merged]
        n += 1
        # early_stopping=False's heuristic: can the best running beam still beat the worst finished one?
        worst = np.where(finished, done_scores.min(), NEG)
        improvable = improvable and bool(np.any(running_scores[0] / np.float32(n**length_penalty) > worst))
        if not improvable or hits.all() or n >= max_new_tokens:
            break
        rows.reorder(parents)
        logits_KxV = rows.step(running[:, n - 1], np.full(k, p + n - 1))
    return done_seqs[0, : done_lens[0]].tolist(), float(done_scores[0])
