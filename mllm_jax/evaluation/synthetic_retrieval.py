"""Text -> image retrieval with FROMAGe's ``[RET]`` (models/retrieval.py) over held-out synthetic scenes:
``python -m mllm_jax.evaluate --model=W --task=synthetic_retrieval [--limit=256]``.

Each of ``num_images`` distinct held-out scenes gives a caption that names it (``located_caption``:
each shape's colour, kind and cell) and its image. A caption is asked as training asks it (the user
turn, then ``[RET]`` as the answer, in the conversation template), with no image: the ``[RET]`` state
through ``text_proj`` is the query; each image's pooled vision feature through ``image_proj`` is a
candidate; cosine similarity ranks the ``num_images`` images for every caption. Rows, as BLIP-2's
retrieval names them (evaluation/retrieval.py, there image -> text): ``eval/retrieval_r1``,
``eval/retrieval_r5`` and ``eval/retrieval_r1_chance`` (1 / num_images: the scenes are distinct).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.data import synthetic, templates
from mllm_jax.errors import UsageError
from mllm_jax.evaluation.decoder import Decoder
from mllm_jax.evaluation.retrieval import retrieval_recall
from mllm_jax.models.retrieval import RET_TOKEN, RetrievalLlava

MAX_NEW_TOKENS = 1  # nothing is generated; SyntheticTask asks every task for one


def distinct_scenes(config: synthetic.SyntheticConfig, n: int) -> list[dict]:
    """The first ``n`` held-out examples whose scenes (captions) differ, in index order."""
    seen, out = set(), []
    for index in range(200 * n):
        ex = synthetic.make_example(config, "heldout", index)
        text = synthetic.located_caption(config, ex["objects"])
        if text not in seen:
            seen.add(text)
            out.append(dict(ex, caption=text))
            if len(out) == n:
                return out
    raise UsageError(f"the held-out split has only {len(out)} distinct scenes, fewer than {n}")


def caption_tokens(decoder: Decoder, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(tokens i32[N, T], mask i32[N, T])``: each caption's conversation up to its
    ``[RET]`` (as training lays it out)."""
    ret = decoder.tokenizer.convert_tokens_to_ids(RET_TOKEN)
    rows = []
    for text in captions:
        turns = [("user", text), ("assistant", RET_TOKEN)]
        tokens, _ = templates.encode_conversation(
            decoder.template, decoder.tokenizer, turns, decoder.model_spec
        )
        at = np.flatnonzero(tokens == ret)
        if not len(at):
            raise UsageError(f"the tokenizer does not keep {RET_TOKEN} as one token")
        rows.append(tokens[: at[-1] + 1])
    pad = decoder.tokenizer.pad_token_id or 0
    length = max(len(r) for r in rows)
    tokens = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, 1
    return tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def _text(model, params, tokens_BxT, mask_BxT):
    return model.apply({"params": params}, tokens_BxT, mask_BxT, method="text_embeddings")


@functools.partial(jax.jit, static_argnums=0)
def _image(model, params, images_Bx1xHxWxC):
    return model.apply({"params": params}, images_Bx1xHxWxC, method="image_embeddings")


def _batched(fn, rows: int, *arrays) -> np.ndarray:
    """``fn`` over ``rows`` rows at a time (the last batch padded with its last row: one compilation)."""
    n, out = len(arrays[0]), []
    for start in range(0, n, rows):
        idx = np.minimum(np.arange(start, start + rows), n - 1)
        out.append(np.asarray(fn(*(jnp.asarray(a[idx]) for a in arrays)), np.float32)[: n - start])
    return np.concatenate(out)


def _scored(decoder: Decoder, synthetic_config, num_images: int):
    if not isinstance(decoder.model, RetrievalLlava):
        raise UsageError("synthetic_retrieval needs a [RET] retrieval head (a config.model.retrieval model)")
    config = dataclasses.replace(synthetic_config, retrieval_captions=True)
    items = distinct_scenes(config, num_images)
    captions = [it["caption"] for it in items]
    tokens, mask = caption_tokens(decoder, captions)
    pixels = np.stack([decoder.image_spec(it["image"]) for it in items])[:, None]
    rows = decoder.rows(num_images)
    text = _batched(functools.partial(_text, decoder.model, decoder.params), rows, tokens, mask)
    image = _batched(functools.partial(_image, decoder.model, decoder.params), rows, pixels)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    scores_NxM = unit(text) @ unit(image).T  # caption n against image m
    recall = retrieval_recall(unit(text)[:, None], unit(image), np.arange(num_images), (1, 5), captions)
    rows_out = {f"eval/retrieval_{k}": v for k, v in recall.items()}
    return rows_out, items, scores_NxM


def retrieval_metrics(decoder: Decoder, synthetic_config, num_images: int) -> dict:
    """``eval/retrieval_r1``, ``eval/retrieval_r5``, ``eval/retrieval_r1_chance`` (text -> image)."""
    return _scored(decoder, synthetic_config, num_images)[0]


def predictions(decoder: Decoder, synthetic_config, num_images: int) -> tuple[dict, list[dict]]:
    """The metrics and one line per caption: the captions of its five best-scored images."""
    rows, items, scores_NxM = _scored(decoder, synthetic_config, num_images)
    order_NxM = np.argsort(-scores_NxM, axis=1, kind="stable")
    lines = [
        {
            "id": i,
            "caption": item["caption"],
            "prediction": items[order_NxM[i, 0]]["caption"],
            "top5": [items[j]["caption"] for j in order_NxM[i, :5]],
            "rank": int(np.flatnonzero(order_NxM[i] == i)[0]) + 1,
        }
        for i, item in enumerate(items)
    ]
    return rows, lines
