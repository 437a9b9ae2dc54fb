"""BLIP-2 stage 1: the Q-Former learns to read the frozen image encoder with three losses.

- ITC (image-text contrastive): each image's query outputs and each caption's first-token output are
  projected and L2-normalised; an image-text score is the max over queries of their dot product,
  divided by the learned temperature ``temp`` (clamped to ``TEMP_RANGE`` in the forward pass; LAVIS
  clamps the parameter itself, here an optimizer would have to). Symmetric cross entropy over
  the in-batch pairs, with LAVIS's label smoothing of ``LABEL_SMOOTHING``. Identical captions in a batch
  are all positives of each other's images (soft targets, as LAVIS does when it knows image ids).
  "In-batch" is the global batch: the train step is one jit over a batch sharded across the mesh.
- ITM (image-text matching): a 2-way ``itm_head`` on the mean query output of a pass where queries and
  text see each other; per image one negative caption, per caption one negative image, drawn over the
  pairs that are not positives (never a pair with the same caption) with probability
  ``(1 - u) * softmax(ITC score / temp) + u / candidates`` (hard negatives as BLIP-2, ``u`` =
  ``ITM_UNIFORM_SHARE`` of easy ones); the positive weighs ``ITM_POSITIVE_WEIGHT`` negatives. An
  example whose caption fills the whole batch has no negatives: only its positive pair counts.
- ITG (image-grounded text generation): the caption's first token becomes [DEC] (``dec_token_id``);
  causal LM over the caption where text sees all queries and the earlier text, queries only queries. The
  output layer is tied to the Q-Former's word embeddings (BERT's LM head without its transform and
  bias), so the stage-1 params are exactly HF ``Blip2ForImageTextRetrieval``'s plus ``temp``.

Batch: ``images`` f32[B, 1, Y, X, 3], ``text_tokens`` i32[B, T] (Q-Former vocabulary, starting with
BOS/CLS, right-padded), ``text_mask`` i32[B, T]. Losses are sums over examples: each example's ITC
term, its ITM terms (weighted) averaged over its (1 to 3) pairs and its ITG NLL averaged over its
target tokens.
ITC and ITG run as one Q-Former call over 2B rows (one mask mode per row); ITM needs the ITC scores
first, so it is a second call over 3B rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LABEL_SMOOTHING = 0.1  # LAVIS: ITC and ITG cross entropies
TEMP_RANGE = (0.001, 0.5)  # LAVIS clamps the learned temperature into this range every step
BATCH_KEYS = ("images", "text_tokens", "text_mask")
# ITM departs from LAVIS in two ways (measured in docs/blip2.md: with LAVIS's choices the head never left
# "always no match"): half of the negatives are drawn uniformly over the other captions instead of by
# ITC similarity (hard negatives that differ in one word give no gradient before ITM can bind words to
# the image), and the positive pair weighs as much as its two negatives together (otherwise "no match"
# is right 2 times in 3 and is where the head settles).
ITM_UNIFORM_SHARE = 0.5
ITM_POSITIVE_WEIGHT = 2.0  # relative to each negative


def _normalize(x):
    """L2-normalise the last axis (torch's F.normalize: eps 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _vision(m, images_Bx1xYxXxC):
    """Image features ``[B, P, E]`` of the vision tower (one image per example)."""
    if images_Bx1xYxXxC.ndim != 5 or images_Bx1xYxXxC.shape[1] != 1:
        raise ValueError(
            f"images must be [B, 1, H, W, C] (one image per example), got {images_Bx1xYxXxC.shape}"
        )
    _, image_BxPxE = m.vision(images_Bx1xYxXxC[:, 0])
    return image_BxPxE


def _image_feats(m, hidden_BxSxD):
    q = m.config.num_query_tokens
    return _normalize(m.adapter.vision_projection(hidden_BxSxD[:, :q]))


def _text_feat(m, text_hidden_BxTxD):
    return _normalize(m.adapter.text_projection(text_hidden_BxTxD[:, 0]))


def itc_scores(image_emb_IxQxE, text_emb_JxE):
    """ITC similarity ``[I, J]``: for each image-text pair, the max over queries of their dot product."""
    return jnp.einsum("iqe,je->ijq", image_emb_IxQxE, text_emb_JxE).max(-1)


def same_text(tokens_BxT, mask_BxT):
    """``[B, B]`` bool: captions i and j are identical (same valid tokens, padding ignored)."""
    valid = mask_BxT.astype(bool)
    t = jnp.where(valid, tokens_BxT, -1)
    return (t[:, None, :] == t[None, :, :]).all(-1) & (valid[:, None, :] == valid[None, :, :]).all(-1)


def _negative_logits(sim_BxB, allowed_BxB, uniform_share: float):
    """Log-probabilities of drawing each candidate: ``(1 - u) * softmax(sim) + u * uniform`` over the
    allowed ones (``-inf`` elsewhere)."""
    hard = jax.nn.log_softmax(jnp.where(allowed_BxB, sim_BxB, -jnp.inf), axis=-1)
    if not uniform_share:
        return hard
    n = jnp.maximum(allowed_BxB.sum(-1, keepdims=True), 1)
    easy = jnp.where(allowed_BxB, -jnp.log(n.astype(sim_BxB.dtype)), -jnp.inf)
    mixed = jnp.logaddexp(hard + jnp.log1p(-uniform_share), easy + jnp.log(uniform_share))
    return jnp.where(allowed_BxB, mixed, -jnp.inf)


def sample_negatives(sim_i2t_BxB, same_BxB, rng, uniform_share: float = 0.0):
    """Hard negatives for ITM, drawn ``∝ softmax(sim)`` among pairs whose captions differ; with
    ``uniform_share > 0`` that share of the draws is uniform over the same candidates instead.

    Returns ``(neg_text_B, neg_image_B, has_neg_B)``: a caption index for each image, an image index
    for each caption, and whether row i had any candidate (where not, its indices are meaningless).
    """
    sim = jax.lax.stop_gradient(sim_i2t_BxB)
    allowed = ~same_BxB
    text_key, image_key = jax.random.split(rng)
    neg_text = jax.random.categorical(text_key, _negative_logits(sim, allowed, uniform_share), axis=-1)
    neg_image = jax.random.categorical(image_key, _negative_logits(sim.T, allowed.T, uniform_share), axis=-1)
    return neg_text, neg_image, allowed.any(-1)


def _soft_cross_entropy(logits_BxB, targets_BxB):
    return -(targets_BxB * jax.nn.log_softmax(logits_BxB, axis=-1)).sum(-1)


def _smoothed_nll(logits_BxTxV, targets_BxT):
    """Token NLL with label smoothing ``(1 - e) * nll + e * mean_v(-log p_v)`` (torch's definition)."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
    return (1 - LABEL_SMOOTHING) * nll - LABEL_SMOOTHING * logp.mean(-1)


def _itc(sim_BxB, same_BxB):
    """Per-example symmetric ITC loss ``[B]`` with soft targets over identical captions."""
    b = sim_BxB.shape[0]
    targets = same_BxB / same_BxB.sum(-1, keepdims=True)
    targets = (1 - LABEL_SMOOTHING) * targets + LABEL_SMOOTHING / b
    return 0.5 * (_soft_cross_entropy(sim_BxB, targets) + _soft_cross_entropy(sim_BxB.T, targets.T))


def _itm_head(m, image_BxPxE, tokens_BxT, mask_BxT):
    hidden = m.adapter.encode(image_BxPxE, tokens_BxT, mask_BxT, "bi")
    return m.adapter.itm_head(hidden[:, : m.config.num_query_tokens]).mean(1)


def _dec(m, tokens_BxT):
    return tokens_BxT.at[:, 0].set(m.config.dec_token_id)


def _itg_logits(m, image_BxPxE, tokens_BxT, mask_BxT):
    hidden = m.adapter.encode(image_BxPxE, _dec(m, tokens_BxT), mask_BxT, "causal")
    return m.adapter.embeddings.attend(hidden[:, m.config.num_query_tokens :])


def _stage1(m, images, tokens_BxT, mask_BxT, rng):
    q = m.config.num_query_tokens
    image_BxPxE = _vision(m, images)
    b = image_BxPxE.shape[0]

    # ITC ("uni": queries and text apart) and ITG ("causal") share one Q-Former call over 2B rows
    hidden = m.adapter.encode(
        jnp.concatenate([image_BxPxE, image_BxPxE]),
        jnp.concatenate([tokens_BxT, _dec(m, tokens_BxT)]),
        jnp.concatenate([mask_BxT, mask_BxT]),
        ("uni",) * b + ("causal",) * b,
    )
    uni, causal = hidden[:b], hidden[b:]
    temp = jnp.clip(m.adapter.temp, *TEMP_RANGE)
    sim_BxB = itc_scores(_image_feats(m, uni), _text_feat(m, uni[:, q:])) / temp
    same_BxB = same_text(tokens_BxT, mask_BxT)
    itc_B = _itc(sim_BxB, same_BxB)

    # ITM: B positives, B (image, negative caption), B (negative image, caption)
    neg_text, neg_image, has_neg = sample_negatives(sim_BxB, same_BxB, rng, ITM_UNIFORM_SHARE)
    logits_3Bx2 = _itm_head(
        m,
        jnp.concatenate([image_BxPxE, image_BxPxE, image_BxPxE[neg_image]]),
        jnp.concatenate([tokens_BxT, tokens_BxT[neg_text], tokens_BxT]),
        jnp.concatenate([mask_BxT, mask_BxT[neg_text], mask_BxT]),
    )
    labels_3B = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    ce_3xB = optax.softmax_cross_entropy_with_integer_labels(logits_3Bx2, labels_3B).reshape(3, b)
    right_3xB = (logits_3Bx2.argmax(-1) == labels_3B).astype(jnp.float32).reshape(3, b)
    weight_3xB = jnp.stack([jnp.ones(b), has_neg, has_neg]).astype(jnp.float32)
    pairs_B = weight_3xB.sum(0)
    loss_weight_3xB = weight_3xB * jnp.array([ITM_POSITIVE_WEIGHT, 1.0, 1.0])[:, None]
    itm_B = (ce_3xB * loss_weight_3xB).sum(0) / loss_weight_3xB.sum(0)
    correct_B = (right_3xB * weight_3xB).sum(0) / pairs_B

    # ITG: predict token t + 1 from the queries and tokens <= t
    logits = m.adapter.embeddings.attend(causal[:, q:])
    target_mask = mask_BxT[:, 1:].astype(jnp.float32)
    nll = _smoothed_nll(logits[:, :-1], tokens_BxT[:, 1:]) * target_mask
    itg_B = nll.sum(-1) / jnp.maximum(target_mask.sum(-1), 1.0)

    aux = {
        "count": jnp.asarray(b, jnp.float32),
        "correct": correct_B.sum(),
        "itc": itc_B.sum(),
        "itm": itm_B.sum(),
        "itg": itg_B.sum(),
    }
    return aux["itc"] + aux["itm"] + aux["itg"], aux


def _check(model, batch: dict):
    if not model.config.itc_embed_dim:
        raise ValueError("stage-1 losses need a BLIP-2 with stage-1 heads: set itc_embed_dim > 0")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"stage-1 batch lacks {missing}; it needs {list(BATCH_KEYS)}")
    tokens, mask = batch["text_tokens"], batch["text_mask"]
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"text_tokens {tokens.shape} and text_mask {mask.shape} must both be [B, T]")
    if batch["images"].shape[0] != tokens.shape[0]:
        raise ValueError(
            f"images {batch['images'].shape} and text_tokens {tokens.shape} differ in batch size"
        )


def stage1_loss(model, params, batch: dict, rng):
    """``(loss_sum, aux)``: ITC + ITM + ITG summed over the batch's examples.

    ``aux``: ``count`` (examples), ``correct`` (ITM accuracy summed over examples), and the per-loss
    sums ``itc``, ``itm``, ``itg``; divide all but ``count`` by ``count``. ``rng`` draws the ITM
    negatives. ``model`` is a ``Blip2`` with ``itc_embed_dim > 0``; jit- and grad-friendly.
    """
    _check(model, batch)
    tokens, mask = batch["text_tokens"].astype(jnp.int32), batch["text_mask"].astype(jnp.int32)
    return model.apply({"params": params}, batch["images"], tokens, mask, rng, method=_stage1)


# ---------------------------------------------------------------- features for retrieval and scoring


def temperature(params) -> float:
    """The ITC temperature the loss divides the similarities by (the learned one, clamped)."""
    return float(jnp.clip(jnp.asarray(params["adapter"]["temp"]).reshape(()), *TEMP_RANGE))


def image_embeddings(model, params, images_Bx1xYxXxC):
    """Normalised ITC image embeddings ``f32[B, Q, E]`` (one per query)."""
    fn = lambda m, x: _image_feats(m, m.adapter.encode(_vision(m, x), mask_mode="uni"))  # noqa: E731
    return model.apply({"params": params}, images_Bx1xYxXxC, method=fn)


def text_embeddings(model, params, tokens_BxT, mask_BxT):
    """Normalised ITC text embeddings ``f32[B, E]`` from the caption alone."""
    fn = lambda m, t, k: _text_feat(m, m.adapter.encode(None, t, k, "uni"))  # noqa: E731
    return model.apply({"params": params}, tokens_BxT, mask_BxT, method=fn)


def itm_logits(model, params, images_Bx1xYxXxC, tokens_BxT, mask_BxT):
    """ITM logits ``[B, 2]`` (no match, match) for the pairs (image i, caption i)."""
    fn = lambda m, x, t, k: _itm_head(m, _vision(m, x), t, k)  # noqa: E731
    return model.apply({"params": params}, images_Bx1xYxXxC, tokens_BxT, mask_BxT, method=fn)


def itg_logits(model, params, images_Bx1xYxXxC, tokens_BxT, mask_BxT):
    """ITG logits ``[B, T, V]``: position t predicts caption token t + 1 (first token -> [DEC])."""
    fn = lambda m, x, t, k: _itg_logits(m, _vision(m, x), t, k)  # noqa: E731
    return model.apply({"params": params}, images_Bx1xYxXxC, tokens_BxT, mask_BxT, method=fn)
