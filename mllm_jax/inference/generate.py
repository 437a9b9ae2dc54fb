"""Jitted autoregressive decoding: one prefill over the (right-padded) prompt, then a compiled
``while_loop`` over a preallocated KV cache, stopping when every sample has produced an EOS.

Works for any model with ``embed(tokens, images)`` and ``decode(embeds, positions, mask, cache, index)``
methods (``Llava``, ``Blip2``, ``Llm``), and for the Flamingo family (``Idefics``), whose images reach
the decoder as ``media`` through cross-attention: the media are computed once, the prompt tokens see
the images ``image_mask [B, T, N]`` allows, and each new token sees what the last prompt token sees
(HF's rule). Prompts are padded to a bucket so repeated calls reuse the compilation.

With a ``mesh`` (``sharding.make_mesh``) decoding is sharded as training is: the prompt batch (and the KV
cache) over ``data`` x ``fsdp``, padded to a multiple of it with copies of the last prompt, and the params
in training's layout (their logical axes under ``rules``), kept as they are when already on that mesh.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import families, sharding
from mllm_jax.models.llm import LlmConfig, init_cache
from mllm_jax.models.xattn import latest_image_mask

PROMPT_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def validate(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def llm_config(model) -> LlmConfig:
    """The config of the decoder that generates (its positions, heads and KV cache)."""
    return families.of_module(model).decoder_config(model.config)


def choose(logits_BxV, rng, sampling: Sampling):
    """Next token from raw logits: argmax, or a sample after temperature / top-k / top-p filtering."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1)
    logits = logits_BxV / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
        # keep tokens whose preceding mass is < top_p: the smallest set reaching top_p, never empty
        keep = (cum - jax.nn.softmax(sorted_desc, axis=-1)) < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def uses_media(model) -> bool:
    """Flamingo-style models read images through cross-attention rather than as tokens."""
    return families.of_module(model).reads_media


def _generate(
    model,
    sampling,
    max_new_tokens,
    batch_sharding,
    params,
    tokens_BxT,
    lengths_B,
    images,
    image_mask,
    embed_kwargs,
    eos_ids,
    rng,
):
    b, t = tokens_BxT.shape
    variables = {"params": params}
    prefill_media, step_media = (), ()
    if uses_media(model) and images is not None:
        media = model.apply(variables, images, method="media")
        if image_mask is None:
            c = model.config
            image_mask = latest_image_mask(tokens_BxT, c.image_token_id, media.shape[1], c.eod_token_id)
        last_BxN = jnp.take_along_axis(image_mask, (lengths_B - 1)[:, None, None], axis=1)
        prefill_media, step_media = (media, image_mask), (media, last_BxN)
    embeds = model.apply(variables, tokens_BxT, images, **embed_kwargs, method="embed")
    stacked = families.of_module(model).scans_layers(model)
    cache = init_cache(llm_config(model), b, t + max_new_tokens, embeds.dtype, stacked)
    if batch_sharding is not None:  # the KV cache is decoding's largest buffer: split it like the batch
        batch_axes = batch_sharding.spec[0]
        spec = PartitionSpec(None, batch_axes) if stacked else PartitionSpec(batch_axes)
        cache = jax.lax.with_sharding_constraint(cache, NamedSharding(batch_sharding.mesh, spec))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, cache = model.apply(
        variables, embeds, positions, None, cache, jnp.zeros((b,), jnp.int32), *prefill_media, method="decode"
    )
    last_BxV = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]

    def cond(state):
        i, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, logits_BxV, cache, done, out_tokens, out_logprobs, rng = state
        rng, step_rng = jax.random.split(rng)
        token_B = choose(logits_BxV, step_rng, sampling).astype(jnp.int32)
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None], axis=1)[
            :, 0
        ]
        out_tokens = out_tokens.at[:, i].set(jnp.where(done, -1, token_B))
        out_logprobs = out_logprobs.at[:, i].set(jnp.where(done, 0.0, logprob_B))
        done = done | jnp.isin(token_B, eos_ids)
        index_B = lengths_B + i
        step_embeds = model.apply(variables, token_B[:, None], None, method="embed")
        logits, cache = model.apply(
            variables, step_embeds, index_B[:, None], None, cache, index_B, *step_media, method="decode"
        )
        return i + 1, logits[:, 0], cache, done, out_tokens, out_logprobs, rng

    state = (
        jnp.int32(0),
        last_BxV,
        cache,
        jnp.zeros((b,), bool),
        jnp.full((b, max_new_tokens), -1, jnp.int32),
        jnp.zeros((b, max_new_tokens), jnp.float32),
        rng,
    )
    _, _, _, _, out_tokens, out_logprobs, _ = jax.lax.while_loop(cond, body, state)
    return out_tokens, out_logprobs


@functools.lru_cache(maxsize=16)
def _compiled(model, sampling: Sampling, max_new_tokens: int, batch_sharding=None, rules=None):
    # rules are read when the step is traced, so they are part of the key like the mesh
    del rules
    return jax.jit(functools.partial(_generate, model, sampling, max_new_tokens, batch_sharding))


def mesh_of(params):
    """The mesh ``params`` are laid out on (training's), or None for host or single-device arrays."""
    for leaf in jax.tree.leaves(params):
        placed = getattr(leaf, "sharding", None)
        if isinstance(placed, NamedSharding) and placed.mesh.size > 1:
            return placed.mesh
    return None


def param_shardings(model, params, mesh, rules):
    """Training's layout of ``params`` on ``mesh``: each leaf's logical axes from an abstract init, as
    ``train.Trainer`` derives them (a dimension its mesh axes do not divide is replicated); leaves that
    are on ``mesh`` already keep their sharding, and leaves the init does not make are replicated."""
    args = families.of_module(model).example_inputs(model.config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
    abstract = nn.meta.unbox(boxed)
    laid_out = sharding.fit_to_shapes(sharding.shardings_of(boxed, mesh, rules), abstract)
    path = jax.tree_util.keystr
    known = {
        path(p): (s, a.shape)
        for (p, s), a in zip(
            jax.tree_util.tree_leaves_with_path(laid_out), jax.tree.leaves(abstract), strict=True
        )
    }
    replicated = sharding.replicated(mesh)

    def place(p, x):
        if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
            return x.sharding
        s, shape = known.get(path(p), (replicated, None))
        return s if shape == tuple(np.shape(x)) else replicated

    return jax.tree_util.tree_map_with_path(place, params)


def place_params(model, params, mesh, rules=None):
    """``params`` on ``mesh`` in training's layout (``param_shardings``); params already all there
    (training's) are returned as they are. Callers decoding many batches place them once."""
    on_mesh = lambda x: isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh  # noqa: E731
    if all(on_mesh(x) for x in jax.tree.leaves(params)):
        return params
    rules = sharding.rules() if rules is None else rules
    return jax.device_put(params, param_shardings(model, params, mesh, rules))


def _gather(x):
    """A sharded result as one host array (across hosts, too)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def pad_prompts(prompts: list[list[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
    """Right-pad token lists to a common bucketed length; returns ``(tokens_BxT, lengths_B)``."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
        raise ValueError("empty prompt")
    t = int(-(-lengths.max() // bucket) * bucket)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


def generate(
    model,
    params,
    prompts: list[list[int]],
    images=None,
    *,
    max_new_tokens: int,
    eos_ids,
    pad_id: int = 0,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    image_mask=None,
    embed_kwargs=None,
    mesh=None,
    rules=None,
):
    """Decode ``max_new_tokens`` (or until EOS) for each prompt.

    ``images``: float ``[B, N, H, W, C]`` preprocessed pixels or None. ``image_mask``: Flamingo family
    only, bool ``[B, T_prompt, N]`` (IdeficsProcessor's ``image_attention_mask``); derived from the
    tokens and ``config.image_token_id`` / ``eod_token_id`` when omitted. ``embed_kwargs``: extra arrays
    for the prompt's ``embed`` (InstructBLIP: ``qformer_tokens_BxT``, ``qformer_mask_BxT``).
    ``mesh``: decode sharded over it (module docstring); ``rules``: ``sharding.rules(...)`` of the run,
    default ``sharding.RULES``. The same tokens come out as on one device.

    Returns per prompt a ``(token_ids, logprobs)`` pair of lists: the generated ids after the prompt,
    EOS included when produced, and each one's log-probability under the raw (untempered) logits.
    """
    sampling.validate()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    c = llm_config(model)
    tokens, lengths = pad_prompts(prompts, pad_id)
    if tokens.shape[1] + max_new_tokens > c.max_positions:
        raise ValueError(
            f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{c.max_positions} positions"
        )
    eos = jnp.asarray(sorted(set(np.atleast_1d(eos_ids).tolist())) or [-1], jnp.int32)
    if image_mask is not None:  # pad its rows like the tokens (padding rows are never read)
        image_mask = np.asarray(image_mask, bool)
        pad = tokens.shape[1] - image_mask.shape[1]
        image_mask = np.pad(image_mask, ((0, 0), (0, pad), (0, 0)))
    images = None if images is None else np.asarray(images)
    embed_kwargs = {k: np.asarray(v) for k, v in (embed_kwargs or {}).items()}
    count = len(prompts)
    batch_sharding = None
    if mesh is not None:
        rules = sharding.rules() if rules is None else tuple(rules)
        batch_sharding = sharding.batch_sharding(mesh)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        # copies of the last row up to a multiple of data x fsdp; their results are dropped
        extra = -count % shards
        grow = lambda x: None if x is None else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])  # noqa: E731
        tokens, lengths, images, image_mask = grow(tokens), grow(lengths), grow(images), grow(image_mask)
        embed_kwargs = {k: grow(v) for k, v in embed_kwargs.items()}
        params = place_params(model, params, mesh, rules)
    put = (lambda x: jnp.asarray(x)) if mesh is None else (lambda x: jax.device_put(x, batch_sharding))  # noqa: E731
    args = (
        params,
        put(tokens),
        put(lengths),
        None if images is None else put(images),
        None if image_mask is None else put(image_mask),
        {k: put(v) for k, v in embed_kwargs.items()},
        eos,
        jax.random.key(seed),
    )
    fn = _compiled(model, sampling, max_new_tokens, batch_sharding, rules)
    if mesh is None:
        out_tokens, out_logprobs = fn(*args)
    else:
        with sharding.activation_context(mesh, rules):  # as Trainer.step traces it
            out_tokens, out_logprobs = fn(*args)
    out_tokens, out_logprobs = _gather(out_tokens)[:count], _gather(out_logprobs)[:count]
    results = []
    for row, lp in zip(out_tokens, out_logprobs, strict=True):
        n = int((row >= 0).sum())
        results.append((row[:n].tolist(), lp[:n].tolist()))
    return results
