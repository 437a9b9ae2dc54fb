"""Decoding one step at a time on fixed shapes, for callers that decide between steps on the host: the
server's continuous batching (requests join and leave rows of one KV cache) and beam search (rows are
reordered after each step).

``Rows`` holds a preallocated KV cache of ``rows`` sequences of ``length`` positions (and, for the
Flamingo family, each row's media and which of them its new tokens see). ``prefill`` runs one prompt and
writes it into a row; ``step`` feeds one token per row, each at its own offset, and returns the next
logits. Shapes are fixed, so ``step`` compiles once and ``prefill`` once per prompt bucket and image
count. A row's stale entries beyond its offset are never read (each query sees the buffer up to its own
position), so a row is reused without clearing it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import families
from mllm_jax.inference.generate import llm_config, pad_prompts
from mllm_jax.models.llm import init_cache
from mllm_jax.models.xattn import latest_image_mask


def choose_rows(logits_BxV, temperature_B, top_p_B, seed_B, count_B):
    """Each row's next token: argmax where its temperature is 0, else a sample after temperature and
    top-p (``generate.choose``'s rule, per row); a row's key is its seed folded with its token count, so
    a request's samples do not depend on which row or batch it decoded in."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled = logits_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p_B[:, None]
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seed_B, count_B)
    sampled_B = jax.vmap(jax.random.categorical)(keys, scaled)
    token_B = jnp.where(temperature_B > 0, sampled_B, greedy_B).astype(jnp.int32)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None], axis=1)[:, 0]
    return token_B, logprob_B


choose_one = jax.jit(choose_rows)  # a prefill's first token


def _batch_axis(stacked: bool) -> int:
    return 1 if stacked else 0


def _prefill(
    model, max_media, stacked, params, cache, media, media_mask, row, tokens_1xT, length, images, kw
):
    variables = {"params": params}
    c = llm_config(model)
    s = jax.tree.leaves(cache)[0].shape[_batch_axis(stacked) + 1]
    one = init_cache(c, 1, s, jax.tree.leaves(cache)[0].dtype, stacked)
    decode_media = ()
    if media is not None:  # the Flamingo family: media computed once, kept in the row
        i = 0 if images is None else images.shape[1]
        if i:
            m_1xIxPxE = model.apply(variables, images, method="media")
            cfg = model.config
            mask_1xTxI = latest_image_mask(tokens_1xT, cfg.image_token_id, i, cfg.eod_token_id)
            decode_media = (m_1xIxPxE, mask_1xTxI)
            last_1xI = mask_1xTxI[:, length - 1]
            padded = jnp.zeros((1, max_media, *m_1xIxPxE.shape[2:]), media.dtype).at[:, :i].set(m_1xIxPxE)
            media = jax.lax.dynamic_update_index_in_dim(media, padded, row, 0)
            row_mask = jnp.zeros((1, max_media), bool).at[:, :i].set(last_1xI)
        else:
            row_mask = jnp.zeros((1, max_media), bool)
        media_mask = jax.lax.dynamic_update_index_in_dim(media_mask, row_mask, row, 0)
    embeds = model.apply(variables, tokens_1xT, images, **kw, method="embed")
    t = tokens_1xT.shape[1]
    positions = jnp.arange(t)[None]
    logits, one = model.apply(
        variables, embeds, positions, None, one, jnp.zeros((1,), jnp.int32), *decode_media, method="decode"
    )
    axis = _batch_axis(stacked)
    cache = jax.tree.map(
        lambda big, small: jax.lax.dynamic_update_index_in_dim(big, small, row, axis), cache, one
    )
    return logits[0, length - 1], cache, media, media_mask


def _step(model, stacked, params, cache, media, media_mask, tokens_B, index_B):
    variables = {"params": params}
    embeds = model.apply(variables, tokens_B[:, None], None, method="embed")
    step_media = () if media is None else (media, media_mask[:, None, :])
    logits, cache = model.apply(
        variables, embeds, index_B[:, None], None, cache, index_B, *step_media, method="decode"
    )
    return logits[:, 0], cache


def _sample_step(
    model, stacked, params, cache, media, media_mask, tokens_B, index_B, temp_B, top_p_B, seed_B, n_B
):
    logits_BxV, cache = _step(model, stacked, params, cache, media, media_mask, tokens_B, index_B)
    return (*choose_rows(logits_BxV, temp_B, top_p_B, seed_B, n_B), cache)


def _reorder(stacked, cache, media, media_mask, rows_B):
    axis = _batch_axis(stacked)
    cache = jax.tree.map(lambda x: jnp.take(x, rows_B, axis=axis), cache)
    if media is not None:
        media, media_mask = jnp.take(media, rows_B, axis=0), jnp.take(media_mask, rows_B, axis=0)
    return cache, media, media_mask


_FNS = {"prefill": (_prefill, (1, 2, 3)), "step": (_step, (1,)), "sample": (_sample_step, (1,))}


@functools.lru_cache(maxsize=32)
def _jitted(kind: str, model, *static):
    """``kind``'s function compiled for ``model`` (the cache buffers donated: they are replaced)."""
    fn, donate = _FNS[kind]
    return jax.jit(functools.partial(fn, model, *static), donate_argnums=donate)


@functools.lru_cache(maxsize=4)
def _jitted_reorder(stacked: bool):
    return jax.jit(functools.partial(_reorder, stacked), donate_argnums=(0, 1, 2))


class Rows:
    """A KV cache of ``rows`` sequences of ``length`` positions, and the model's compiled steps on it."""

    def __init__(self, model, params, rows: int, length: int, max_media: int = 4):
        self.model, self.params, self.rows, self.length = model, params, rows, length
        family = families.of_module(model)
        self.stacked = family.scans_layers(model)
        self.cache = init_cache(llm_config(model), rows, length, model.dtype, self.stacked)
        self.max_media = max_media
        self.media = self.media_mask = None
        if family.reads_media:
            tokens, images = family.example_inputs(model.config)
            shape = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="media"), params, images)
            self.media = jnp.zeros((rows, max_media, *shape.shape[2:]), model.dtype)
            self.media_mask = jnp.zeros((rows, max_media), bool)

    def prefill(self, row: int, tokens: list[int], images=None, embed_kwargs=None, model=None):
        """Run one prompt into ``row``; returns the logits ``[V]`` after its last token. ``model``: the
        same architecture with the request's config (IDEFICS' image token ids), default ``self.model``."""
        tokens_1xT, lengths = pad_prompts([tokens], 0)
        if tokens_1xT.shape[1] > self.length:
            raise ValueError(f"a prompt of {len(tokens)} tokens does not fit {self.length} positions")
        if images is not None and images.shape[1] > self.max_media and self.media is not None:
            raise ValueError(f"{images.shape[1]} images: at most {self.max_media} per prompt")
        fn = _jitted("prefill", model or self.model, self.max_media, self.stacked)
        kw = {k: jnp.asarray(v) for k, v in (embed_kwargs or {}).items()}
        images = None if images is None or images.shape[1] == 0 else jnp.asarray(images)
        logits_V, self.cache, self.media, self.media_mask = fn(
            self.params, self.cache, self.media, self.media_mask, row, tokens_1xT, int(lengths[0]), images, kw
        )
        return logits_V

    def step(self, tokens_B, index_B):
        """One token per row at its own offset -> logits ``[rows, V]`` (f32)."""
        fn = _jitted("step", self.model, self.stacked)
        logits, self.cache = fn(
            self.params, self.cache, self.media, self.media_mask, *self._ints(tokens_B, index_B)
        )
        return logits

    def sample(self, tokens_B, index_B, temperature_B, top_p_B, seed_B, count_B):
        """``step`` then each row's choice (``choose_rows``): ``(tokens [rows], logprobs [rows])``."""
        fn = _jitted("sample", self.model, self.stacked)
        token_B, logprob_B, self.cache = fn(
            self.params,
            self.cache,
            self.media,
            self.media_mask,
            *self._ints(tokens_B, index_B),
            jnp.asarray(temperature_B, jnp.float32),
            jnp.asarray(top_p_B, jnp.float32),
            *self._ints(seed_B, count_B),
        )
        return token_B, logprob_B

    def reorder(self, rows_B):
        """Row ``i`` becomes a copy of row ``rows_B[i]`` (beam search)."""
        fn = _jitted_reorder(self.stacked)
        self.cache, self.media, self.media_mask = fn(
            self.cache, self.media, self.media_mask, jnp.asarray(rows_B, jnp.int32)
        )

    @staticmethod
    def _ints(*xs):
        return tuple(jnp.asarray(np.asarray(x), jnp.int32) for x in xs)
