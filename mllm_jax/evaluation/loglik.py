"""Scoring continuations by log-likelihood (``evaluate --mc=loglik``): one teacher-forced forward pass
over prompt + continuation, the continuation's mean token log-probability (SEED-Bench's rule: the
option with the lowest mean token loss wins).

The forward pass is ``generate``'s prefill without a cache: ``embed`` (images spliced in, or computed
once as media for cross-attention models) then ``decode``, causal over the right-padded rows. With the
decoder's mesh the rows are sharded over ``data`` x ``fsdp`` and the params are placed as for decoding.
Shape letters: B rows (an item's options are rows of their own), T token positions, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import sharding
from mllm_jax.evaluation.decoder import pad_rows
from mllm_jax.inference import generate
from mllm_jax.models.xattn import latest_image_mask


def continuation(prompt_tokens: list[int], full_tokens: list[int]) -> tuple[int, int]:
    """``(start, end)`` of the continuation's tokens in ``full_tokens``: the tokens after the longest
    common prefix with the prompt's (a tokenizer may merge the prompt's last piece with the answer)."""
    start = 0
    while start < min(len(prompt_tokens), len(full_tokens)) and prompt_tokens[start] == full_tokens[start]:
        start += 1
    if start >= len(full_tokens):
        raise ValueError("the option adds no tokens to the prompt")
    return max(start, 1), len(full_tokens)  # position 0 has no prediction


def _token_logprobs(model, tokens_BxT, images, embed_kwargs, params):
    """log p(token t | tokens < t) for t >= 1: f32[B, T-1]."""
    variables = {"params": params}
    media = ()
    if generate.uses_media(model) and images is not None:
        media_BxMxPxE = model.apply(variables, images, method="media")
        c = model.config
        mask_BxTxM = latest_image_mask(tokens_BxT, c.image_token_id, media_BxMxPxE.shape[1], c.eod_token_id)
        media = (media_BxMxPxE, mask_BxTxM)
    embeds_BxTxD = model.apply(variables, tokens_BxT, images, **embed_kwargs, method="embed")
    logits_BxTxV, _ = model.apply(variables, embeds_BxTxD, None, None, None, None, *media, method="decode")
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


@functools.lru_cache(maxsize=8)
def _compiled(model, mesh=None, rules=None):
    del rules  # read when traced: part of the key like the mesh
    out = None if mesh is None else sharding.replicated(mesh)  # every process reads every row
    return jax.jit(functools.partial(_token_logprobs, model), out_shardings=out)


def _forward(decoder, tokens_BxT, pixels, kwargs):
    fn = _compiled(decoder.model, decoder.mesh, decoder.rules)
    if decoder.mesh is None:
        put = jnp.asarray
        return np.asarray(
            fn(put(tokens_BxT), None if pixels is None else put(pixels), kwargs, decoder.params)
        )
    rules = sharding.rules() if decoder.rules is None else tuple(decoder.rules)
    batch = sharding.batch_sharding(decoder.mesh)
    put = lambda x: None if x is None else jax.device_put(x, batch)  # noqa: E731
    args = (put(tokens_BxT), put(pixels), {k: put(v) for k, v in kwargs.items()})
    params = generate.place_params(decoder.model, decoder.params, decoder.mesh, rules)
    with sharding.activation_context(decoder.mesh, rules):
        return np.asarray(fn(*args, params))


def mean_logprobs(
    decoder, prompts: list[list[int]], pixels_BxNxHxWxC, embed_kwargs: dict, spans
) -> list[float]:
    """Each row's mean log-probability over its ``spans[i] = (start, end)`` tokens, in batches of the
    decoder's ``batch_size`` rows (a multiple of the mesh's batch shards; short batches padded)."""
    rows = decoder.batch_size
    if decoder.mesh is not None:
        shards = decoder.mesh.shape["data"] * decoder.mesh.shape["fsdp"]
        rows = -(-rows // shards) * shards
    pad_id = decoder.tokenizer.pad_token_id or 0
    limit = generate.llm_config(decoder.model).max_positions
    scores = []
    for start in range(0, len(prompts), rows):
        stop = min(start + rows, len(prompts))
        pixels = None if pixels_BxNxHxWxC is None else pixels_BxNxHxWxC[start:stop]
        kwargs = {k: v[start:stop] for k, v in embed_kwargs.items()}
        chunk, pixels, kwargs = pad_rows(rows, prompts[start:stop], pixels, kwargs)
        tokens_BxT, _ = generate.pad_prompts(chunk, pad_id)
        if tokens_BxT.shape[1] > limit:
            raise ValueError(
                f"prompt + option ({tokens_BxT.shape[1]} tokens) exceeds the model's {limit} positions"
            )
        logp_BxT = _forward(decoder, tokens_BxT, pixels, kwargs)
        for i, (s, e) in enumerate(spans[start:stop]):
            scores.append(float(np.mean(logp_BxT[i, s - 1 : e - 1])))  # row t-1 scores token t
    return scores
