"""Image -> text retrieval recall with BLIP-2's ITC embeddings (stage 1), and its ITM head.

An image's score for a text is the max over its query embeddings of their dot product with the text
embedding (``blip2_stage1.itc_scores``). Recall@k: the share of images with a ground-truth text among
their k best-scored texts, where texts are compared by their text (``text_keys``), so an identical
caption of another image counts as a hit: the synthetic data has many identical captions.

ITM re-ranking as BLIP-2 retrieves: each image's ``ITM_TOP_K`` best texts by ITC are scored again and
ranked by that score ahead of the rest. The score is the sum of two log-likelihoods, ITC's logit (the
similarity over the learned temperature, as in the ITC loss) and the log-probability of "match" from
the ITM head; LAVIS's ``compute_sim_matrix`` adds the raw similarity to the raw match logit instead,
whose scales are arbitrary against each other (docs/blip2.md has both figures). ITM accuracy is
measured on balanced held-out pairs: each image with its own caption and with the caption of another
image that differs from it (drawn with a fixed seed).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.data import synthetic
from mllm_jax.models import blip2_stage1

ITM_TOP_K = 16  # ITC candidates per image that ITM re-ranks (BLIP-2 on COCO: 128 of 25k texts)


def retrieval_recall(
    image_emb_NxQxE,
    text_emb_MxE,
    gt_text_of_image,
    ks: Sequence[int] = (1, 5),
    text_keys: Sequence[Hashable] | None = None,
    scores_NxM=None,
) -> dict:
    """Image -> text recall@k.

    ``gt_text_of_image``: int ``[N]`` (or ``[N, G]``, -1 padding) indices of each image's ground-truth
    texts among the M. ``text_keys``: M keys (e.g. the caption strings); texts with equal keys are the
    same text. Default: all texts distinct. Returns ``{"r{k}": ...}`` for each k and ``"r1_chance"``:
    the mean over images of (#texts equal to a ground truth / M), recall@1 of a random ranking.
    ``scores_NxM``: rank by these instead of the ITC scores of the embeddings (e.g. ``rerank``'s).
    """
    image = np.asarray(image_emb_NxQxE, np.float32)
    text = np.asarray(text_emb_MxE, np.float32)
    if image.ndim != 3 or text.ndim != 2 or image.shape[2] != text.shape[1]:
        raise ValueError(
            f"need image embeddings [N, Q, E] and text embeddings [M, E], got {image.shape}, {text.shape}"
        )
    n, m = image.shape[0], text.shape[0]
    gt = np.asarray(gt_text_of_image)
    gt = gt[:, None] if gt.ndim == 1 else gt
    if gt.ndim != 2 or gt.shape[0] != n or not np.issubdtype(gt.dtype, np.integer):
        raise ValueError(
            f"gt_text_of_image must be ints [N] or [N, G] with N={n}, got {gt.dtype}{list(gt.shape)}"
        )
    if (gt >= m).any() or (gt < -1).any() or (gt < 0).all(1).any():
        raise ValueError(f"gt_text_of_image: every image needs a ground-truth index in [0, {m}) (-1 pads)")
    keys = list(range(m)) if text_keys is None else list(text_keys)
    if len(keys) != m:
        raise ValueError(f"text_keys has {len(keys)} entries for {m} texts")
    ids = {}
    text_class_M = np.array([ids.setdefault(k, len(ids)) for k in keys])
    gt_class_NxG = np.where(gt >= 0, text_class_M[np.maximum(gt, 0)], -1)
    correct_NxM = (text_class_M[None, :, None] == gt_class_NxG[:, None, :]).any(-1)

    scores_NxM = np.einsum("nqe,me->nmq", image, text).max(-1) if scores_NxM is None else scores_NxM
    if scores_NxM.shape != (n, m):
        raise ValueError(f"scores must be [{n}, {m}], got {scores_NxM.shape}")
    order_NxM = np.argsort(-scores_NxM, axis=1, kind="stable")
    ranked_hits = np.take_along_axis(correct_NxM, order_NxM, axis=1)
    out = {f"r{k}": float(ranked_hits[:, : min(k, m)].any(1).mean()) for k in ks}
    out["r1_chance"] = float((correct_NxM.sum(1) / m).mean())
    return out


def top_k(scores_NxM, k: int):
    """Indices ``[N, min(k, M)]`` of each row's k best scores, best first (ties: the lower index)."""
    scores_NxM = np.asarray(scores_NxM)
    return np.argsort(-scores_NxM, axis=1, kind="stable")[:, : min(k, scores_NxM.shape[1])]


def rerank(scores_NxM, candidates_NxK, itm_match_NxK):
    """Scores ``[N, M]`` after ITM re-ranking: a candidate's is its ITC score + its ITM match score,
    placed above every non-candidate (which keep their ITC order below)."""
    scores_NxM = np.asarray(scores_NxM, np.float64)
    out = scores_NxM - (np.abs(scores_NxM).max() + np.abs(itm_match_NxK).max() + 1.0) * 4
    rows = np.arange(len(scores_NxM))[:, None]
    out[rows, candidates_NxK] = scores_NxM[rows, candidates_NxK] + itm_match_NxK
    return out


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, params, images_Bx1xHxWxC, tokens_BxT, mask_BxT):
    return (
        blip2_stage1.image_embeddings(model, params, images_Bx1xHxWxC),
        blip2_stage1.text_embeddings(model, params, tokens_BxT, mask_BxT),
    )


def encode_captions(tokenizer, captions: Sequence[str], text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(tokens i32[M, T], mask i32[M, T])``; a caption longer than T is an error."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(captions), text_length), pad, np.int32)
    mask = np.zeros((len(captions), text_length), np.int32)
    for i, text in enumerate(captions):
        ids = tokenizer(text)["input_ids"]
        if len(ids) > text_length:
            raise ValueError(
                f"text_length {text_length} is too short for caption {text!r} ({len(ids)} tokens)"
            )
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    return tokens, mask


def synthetic_retrieval(
    model,
    params,
    tokenizer,
    image_spec,
    synthetic_config: synthetic.SyntheticConfig,
    num_images: int,
    text_length: int,
    batch_size: int = 16,
    split: str = "heldout",
) -> dict:
    """Recall@1/5 of image -> caption retrieval over ``num_images`` synthetic images of ``split``.

    Each image's own caption is its ground truth; identical captions count (see ``retrieval_recall``).
    Embeddings are computed in batches of ``batch_size`` (the last one padded) with one compilation.
    Returns ``eval/retrieval_r1``, ``eval/retrieval_r5``, ``eval/retrieval_r1_chance``, the same
    recalls after ITM re-ranking (``eval/retrieval_r1_itm``, ``eval/retrieval_r5_itm``; ``ITM_TOP_K``
    candidates) and ``eval/itm_accuracy`` on the balanced pairs (``balanced_negatives``).
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"need num_images >= 1 and batch_size >= 1, got {num_images}, {batch_size}")
    examples = [synthetic.make_example(synthetic_config, split, i) for i in range(num_images)]
    captions = [ex["caption"] for ex in examples]
    pixels = np.stack([image_spec(ex["image"]) for ex in examples])[:, None]
    tokens, mask = encode_captions(tokenizer, captions, text_length)
    image_emb, text_emb = [], []
    for start in range(0, num_images, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), num_images - 1)  # pad with the last one
        img, txt = _embed(
            model, params, jnp.asarray(pixels[idx]), jnp.asarray(tokens[idx]), jnp.asarray(mask[idx])
        )
        keep = min(batch_size, num_images - start)
        image_emb.append(np.asarray(img)[:keep])
        text_emb.append(np.asarray(txt)[:keep])
    image_emb, text_emb = np.concatenate(image_emb), np.concatenate(text_emb)
    gt = np.arange(num_images)
    recall = retrieval_recall(image_emb, text_emb, gt, (1, 5), captions)

    # ITC logits, and the ITM log-probability of "match" for each image's top-k captions
    scores_NxM = np.einsum("nqe,me->nmq", image_emb, text_emb).max(-1) / blip2_stage1.temperature(params)
    candidates_NxK = top_k(scores_NxM, ITM_TOP_K)
    rows_NxK = np.broadcast_to(np.arange(num_images)[:, None], candidates_NxK.shape)
    logits = _itm_logits_of_pairs(
        model, params, pixels, tokens, mask, rows_NxK.ravel(), candidates_NxK.ravel(), ITM_PAIR_BATCH
    )
    itm_NxK = np.asarray(jax.nn.log_softmax(logits, axis=-1))[:, 1].reshape(candidates_NxK.shape)
    reranked = retrieval_recall(
        image_emb, text_emb, gt, (1, 5), captions, scores_NxM=rerank(scores_NxM, candidates_NxK, itm_NxK)
    )
    negatives = balanced_negatives(captions, seed=0)
    has_neg = negatives >= 0
    pos_logits = _itm_logits_of_pairs(model, params, pixels, tokens, mask, gt, gt, ITM_PAIR_BATCH)
    neg_logits = _itm_logits_of_pairs(
        model, params, pixels, tokens, mask, gt[has_neg], negatives[has_neg], ITM_PAIR_BATCH
    )
    right = np.concatenate([pos_logits.argmax(-1) == 1, neg_logits.argmax(-1) == 0])
    return {
        "eval/retrieval_r1": recall["r1"],
        "eval/retrieval_r5": recall["r5"],
        "eval/retrieval_r1_chance": recall["r1_chance"],
        "eval/retrieval_r1_itm": reranked["r1"],
        "eval/retrieval_r5_itm": reranked["r5"],
        "eval/itm_accuracy": float(right.mean()),
    }


def balanced_negatives(captions: Sequence[str], seed: int = 0) -> np.ndarray:
    """For each caption, the index of another whose text differs, drawn uniformly (-1: none differs)."""
    rng = np.random.default_rng(seed)
    captions = np.asarray(captions, dtype=object)
    out = np.full(len(captions), -1, np.int64)
    for i, text in enumerate(captions):
        others = np.flatnonzero(captions != text)
        if len(others):
            out[i] = rng.choice(others)
    return out


ITM_PAIR_BATCH = 128  # (image, caption) pairs per ITM call: one compilation


@functools.partial(jax.jit, static_argnums=0)
def _itm(model, params, images_Bx1xHxWxC, tokens_BxT, mask_BxT):
    return blip2_stage1.itm_logits(model, params, images_Bx1xHxWxC, tokens_BxT, mask_BxT)


def _itm_logits_of_pairs(model, params, pixels, tokens, mask, image_idx, text_idx, batch_size):
    """ITM logits ``[P, 2]`` of the pairs (image ``image_idx[p]``, caption ``text_idx[p]``)."""
    image_idx, text_idx = np.asarray(image_idx), np.asarray(text_idx)
    out = []
    for start in range(0, len(image_idx), batch_size):
        sel = np.minimum(np.arange(start, start + batch_size), len(image_idx) - 1)  # pad with the last
        i, t = image_idx[sel], text_idx[sel]
        logits = _itm(model, params, jnp.asarray(pixels[i]), jnp.asarray(tokens[t]), jnp.asarray(mask[t]))
        out.append(np.asarray(logits, np.float32)[: min(batch_size, len(image_idx) - start)])
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)
