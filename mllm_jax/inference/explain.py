"""Attention maps: where an answer's tokens looked in the image.

One forward pass over the prompt and the answer (no cache) captures the query and key projections of
the attentions that matter; their probabilities are recomputed as the model computes them (RoPE,
grouped-query heads, qk norms, masks, softmax in f32). Where the images reach the LLM decides what is
drawn (the family's ``attention_map`` hook):

- ``"tokens"`` (LLaVA): image features are tokens of the LLM's sequence, one per patch: the LLM's
  self-attention from the answer's tokens onto each image's tokens.
- ``"cross_attention"`` (Flamingo / IDEFICS): the gated cross-attention of the answer's tokens onto the
  media they may see (the latest image). Without a resampler its keys are the patches. With one they are
  latents, which are not spatial: each latent's share of each patch is the resampler's attention composed
  over its blocks (a latent reads patches directly, and through the latents it attends to, which read
  patches in the block before: ``R_i+1 = A_i[:, patches] + A_i[:, latents] @ R_i``, ``R_0 = 0``; heads
  averaged; the residual stream is not counted), and the map is the cross-attention onto the latents
  times that.
- ``"qformer"`` (BLIP-2 / InstructBLIP): the Q-Former's cross-attention of its queries onto the patches,
  weighted by the LLM's self-attention from the answer's tokens onto the query tokens.

The map averages the answer's tokens and the heads, and the layers or one chosen layer (``layer``: the
LLM layer; the gated cross-attention block; the Q-Former's cross-attention layer, the LLM's weights
then averaged over its layers). A class token's feature has no place on the grid and is left out.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import families
from mllm_jax.errors import UsageError
from mllm_jax.inference.generate import llm_config
from mllm_jax.models.llm import LlmConfig, apply_rope, rope_inv_freq
from mllm_jax.models.xattn import latest_image_mask

PROJECTIONS = ("q_proj", "k_proj", "q_layer_norm", "k_layer_norm", "query", "key")


@dataclasses.dataclass
class AttentionMap:
    maps_IxGxG: np.ndarray  # per image, the patch grid's share of the answer's attention (sums to <= 1)
    per_layer_LxIxGxG: np.ndarray  # the same, one map per layer
    image_attention_LxNxAxS: np.ndarray  # per layer and head: answer queries x the keys mapped
    # BLIP-2: the Q-Former's cross-attention per layer and head, queries x patches
    qformer_attention_LxNxQxP: np.ndarray | None = None


def _captured(model, params, tokens_1xT, images, embed_kwargs=None) -> dict:
    """Run the model over ``tokens`` (no cache) and keep its attentions' q/k projections (and qk norms)."""

    def wanted(module, method):
        return method == "__call__" and module.name in PROJECTIONS

    _, state = model.apply(
        {"params": params},
        tokens_1xT,
        images,
        capture_intermediates=wanted,
        mutable=["intermediates"],
        **{k: jnp.asarray(v) for k, v in (embed_kwargs or {}).items()},
    )
    return state["intermediates"]


def _heads(scope: dict, kind: str, num_heads: int, head_dim: int):
    """``[B, S, N, H]`` queries (``kind`` "q") or keys ("k") of one attention: its qk norm's output if
    it has one, else its projection's."""
    names = {"q": ("q_layer_norm", "q_proj", "query"), "k": ("k_layer_norm", "k_proj", "key")}[kind]
    x = next(scope[n]["__call__"][0] for n in names if n in scope)
    return jnp.asarray(x, jnp.float32).reshape(*x.shape[:2], num_heads, head_dim)


def _softmax(q_NxAxH, k_SxNxH, allowed_AxS=None):
    """Attention probabilities ``[N, A, S]`` (scaled by 1/sqrt(H), f32; ``allowed``: the mask)."""
    scores = jnp.einsum("nah,snh->nas", q_NxAxH, k_SxNxH) / np.sqrt(q_NxAxH.shape[-1])
    if allowed_AxS is not None:
        scores = jnp.where(allowed_AxS[None], scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def _sequence(prompt: list[int], answer: list[int]) -> np.ndarray:
    return np.asarray([prompt + answer[:-1]], np.int32)  # the last answer token is never a query


def attention_onto_images(
    model, params, prompt: list[int], answer: list[int], pixels, embed_kwargs=None, captured=None
) -> np.ndarray:
    """Self-attention probabilities ``[L, N, A, T]`` of the answer's tokens (queries: the positions that
    predicted them) over the whole sequence, for a model that splices image (or query) tokens into it."""
    c = llm_config(model)
    tokens = _sequence(prompt, answer)
    t, a = tokens.shape[1], len(answer)
    if captured is None:
        captured = _captured(model, params, jnp.asarray(tokens), jnp.asarray(pixels), embed_kwargs)
    layers = captured["llm"]
    rope = isinstance(c, LlmConfig)  # OPT's positions are learned embeddings: no rotation
    inv_freq = rope_inv_freq(c) if rope else None
    positions = jnp.arange(t)[None]
    out = []
    for i in range(c.num_layers):
        proj = layers[f"layers_{i}"]["self_attn"]
        q = proj["q_proj"]["__call__"][0].reshape(1, t, c.num_heads, c.head_dim)
        k = proj["k_proj"]["__call__"][0].reshape(1, t, c.num_kv_heads, c.head_dim)
        if rope:
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k = jnp.repeat(k, c.num_heads // c.num_kv_heads, axis=2)
        q_NxAxH = q[0, t - a :].transpose(1, 0, 2).astype(jnp.float32)
        causal_AxT = jnp.arange(t)[None, :] <= jnp.arange(t - a, t)[:, None]
        if getattr(c, "sliding_window", None):
            causal_AxT &= jnp.arange(t - a, t)[:, None] - jnp.arange(t)[None, :] < c.sliding_window
        out.append(_softmax(q_NxAxH, k[0].astype(jnp.float32), causal_AxT))
    return np.asarray(jnp.stack(out))


def _grid(model) -> int:
    v = families.of_module(model).vision_config(model.config)
    return v.image_size // v.patch_size if v is not None else 0


def _on_grid(per_layer_LxIxP: np.ndarray, grid: int) -> np.ndarray:
    """Shares of each image's vision tokens ``[L, I, P]`` -> ``[L, I, G, G]`` (a class token left out)."""
    p = per_layer_LxIxP.shape[-1]
    return per_layer_LxIxP[..., p - grid * grid :].reshape(*per_layer_LxIxP.shape[:2], grid, grid)


def _checked_layer(layer: int | None, num_layers: int, what: str):
    if layer is not None and not -num_layers <= layer < num_layers:
        raise UsageError(f"--explain_layer={layer}: {what} has {num_layers} layers")


def patch_tokens(model, prompt: list[int], pixels) -> tuple[np.ndarray, int, int]:
    """Where the image tokens are (``(positions, tokens per image, patch grid side)``), or a one-line
    ``UsageError`` for a model whose image tokens are not one per patch (checked before decoding)."""
    cfg, grid = model.config, _grid(model)
    is_image = np.asarray(prompt) == getattr(cfg, "image_token_id", None)
    n_images = 0 if pixels is None else pixels.shape[1]
    per_image = int(is_image.sum()) // max(n_images, 1)
    if n_images == 0 or not is_image.any() or per_image not in (grid * grid, grid * grid + 1):
        raise UsageError(
            "--explain needs a model whose image features are tokens of the sequence, one per patch "
            "(LLaVA), or reach it by cross-attention (IDEFICS) or a Q-Former (BLIP-2); this model's "
            "images reach the LLM otherwise"
        )
    return np.flatnonzero(is_image), per_image, grid


def check(model, prompt: list[int], pixels) -> None:
    """A one-line ``UsageError`` (before decoding) for inputs or a model ``--explain`` cannot draw."""
    if pixels is None or pixels.shape[1] == 0:
        raise UsageError("--explain needs an --image")
    kind = families.of_module(model).attention_map
    if kind == "tokens":
        patch_tokens(model, prompt, pixels)
    elif kind == "cross_attention" and model.config.frames_per_media > 1:
        raise UsageError("--explain draws images, not video clips")
    elif kind not in MAPS:
        raise UsageError(f"--explain: no attention map for this model ({kind!r})")


def _tokens_map(model, params, prompt, answer, pixels, layer, embed_kwargs):
    image_cols, per_image, grid = patch_tokens(model, prompt, pixels)
    probs_LxNxAxT = attention_onto_images(model, params, prompt, answer, pixels, embed_kwargs)
    num_layers = probs_LxNxAxT.shape[0]
    _checked_layer(layer, num_layers, "the LLM")
    onto_LxNxAxS = probs_LxNxAxT[..., image_cols]
    per_layer = onto_LxNxAxS.mean(axis=(1, 2)).reshape(num_layers, pixels.shape[1], per_image)
    per_layer = _on_grid(per_layer, grid)
    maps = per_layer.mean(axis=0) if layer is None else per_layer[layer]
    return AttentionMap(maps, per_layer, onto_LxNxAxS)


def resampler_shares(scope: dict, c, num_patches: int) -> np.ndarray:
    """Each latent's share of each patch ``[BI, Q, P]``: the perceiver's attention (heads averaged)
    composed over its blocks (module docstring); ``scope``: the captured ``perceiver``."""
    share = None
    for i in range(c.depth):
        attn = scope[f"blocks_{i}"]["attn"]
        q_BxQxNxH = _heads(attn, "q", c.num_heads, c.head_dim)
        k_BxSxNxH = _heads(attn, "k", c.num_heads, c.head_dim)
        scores = jnp.einsum("bqnh,bsnh->bnqs", q_BxQxNxH, k_BxSxNxH) / np.sqrt(c.head_dim)
        a_BxQxS = jax.nn.softmax(scores, axis=-1).mean(axis=1)
        onto = a_BxQxS[..., :num_patches]
        share = onto if share is None else onto + a_BxQxS[..., num_patches:] @ share
    return np.asarray(share)


def _cross_attention_map(model, params, prompt, answer, pixels, layer, embed_kwargs):
    c = model.config
    tokens = _sequence(prompt, answer)
    t, a, m = tokens.shape[1], len(answer), pixels.shape[1]
    adapter = _captured(model, params, jnp.asarray(tokens), jnp.asarray(pixels), embed_kwargs)["adapter"]
    seen_AxM = latest_image_mask(jnp.asarray(tokens), c.image_token_id, m, c.eod_token_id)[0, t - a :]
    sees_A = seen_AxM.any(axis=-1)  # a token that sees no image gets no cross-attention (its gate)
    allowed_AxS = jnp.repeat(seen_AxM | ~sees_A[:, None], c.tokens_per_image, axis=-1)
    x, probs = c.xattn, []
    for j in range(c.num_xattn_layers):
        scope = adapter[f"xattn_{j}"]["cross_attn"]
        q_NxAxH = _heads(scope, "q", x.num_heads, x.head_dim)[0, t - a :].transpose(1, 0, 2)
        k_SxNxH = _heads(scope, "k", x.num_heads, x.head_dim)[0]
        probs.append(_softmax(q_NxAxH, k_SxNxH, allowed_AxS) * sees_A[None, :, None])
    probs_JxNxAxS = np.asarray(jnp.stack(probs))
    _checked_layer(layer, len(probs), "the gated cross-attention")
    per_layer = probs_JxNxAxS.mean(axis=(1, 2)).reshape(len(probs), m, c.tokens_per_image)
    if c.use_resampler:  # latents -> patches
        share_MxQxP = resampler_shares(adapter["perceiver"], c.perceiver, c.vision.num_positions)
        per_layer = np.einsum("jmq,mqp->jmp", per_layer, share_MxQxP)
    per_layer = _on_grid(per_layer, _grid(model))
    maps = per_layer.mean(axis=0) if layer is None else per_layer[layer]
    return AttentionMap(maps, per_layer, probs_JxNxAxS)


def _qformer_map(model, params, prompt, answer, pixels, layer, embed_kwargs):
    c = model.config
    tokens = _sequence(prompt, answer)
    captured = _captured(model, params, jnp.asarray(tokens), jnp.asarray(pixels), embed_kwargs)
    query_cols = np.flatnonzero(np.asarray(prompt) == c.image_token_id)
    if pixels.shape[1] != 1 or len(query_cols) != c.num_query_tokens:
        raise UsageError(
            f"--explain needs one image and its {c.num_query_tokens} query tokens in the prompt, got "
            f"{pixels.shape[1]} image(s) and {len(query_cols)} query tokens"
        )
    probs_LxNxAxT = attention_onto_images(model, params, prompt, answer, pixels, captured=captured)
    onto_LxNxAxQ = probs_LxNxAxT[..., query_cols]
    weights_Q = onto_LxNxAxQ.mean(axis=(0, 1, 2))
    q, qformer, cross = c.qformer, captured["adapter"]["qformer"], []
    for i in range(q.num_layers):
        if q.has_cross_attention(i):
            scope = qformer[f"layer_{i}"]["crossattention"]
            q_NxQxH = _heads(scope, "q", q.num_heads, q.head_dim)[0].transpose(1, 0, 2)
            cross.append(_softmax(q_NxQxH, _heads(scope, "k", q.num_heads, q.head_dim)[0]))
    cross_LxNxQxP = np.asarray(jnp.stack(cross))
    _checked_layer(layer, len(cross), "the Q-Former's cross-attention")
    per_layer = np.einsum("q,lqp->lp", weights_Q, cross_LxNxQxP.mean(axis=1))[:, None]
    per_layer = _on_grid(per_layer, _grid(model))
    maps = per_layer.mean(axis=0) if layer is None else per_layer[layer]
    return AttentionMap(maps, per_layer, onto_LxNxAxQ, cross_LxNxQxP)


# a family's ``attention_map`` -> how its map is computed (module docstring)
MAPS = {"tokens": _tokens_map, "cross_attention": _cross_attention_map, "qformer": _qformer_map}


def explain(
    model, params, prompt: list[int], answer: list[int], pixels, layer: int | None = None, embed_kwargs=None
) -> AttentionMap:
    """The answer's attention onto each image's patch grid (module docstring); ``layer``: one layer's
    map (an index, negative from the end) instead of the layers' mean."""
    if not answer:
        raise UsageError("--explain needs at least one generated token")
    check(model, prompt, pixels)
    kind = families.of_module(model).attention_map
    return MAPS[kind](model, params, prompt, answer, pixels, layer, embed_kwargs)


def heatmap_image(pixels_YxXxC: np.ndarray, map_GxG: np.ndarray, size: int = 336):
    """The model's input image (its normalisation undone per channel) with ``map`` over it in red."""
    from PIL import Image

    x = pixels_YxXxC - pixels_YxXxC.min(axis=(0, 1))
    x = x / np.maximum(x.max(axis=(0, 1)), 1e-6)
    base_img = Image.fromarray((x * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    heat = map_GxG / max(float(map_GxG.max()), 1e-12)
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    h = np.asarray(heat_img, np.float32)[..., None] / 255
    red = np.zeros((size, size, 3), np.float32)
    red[..., 0] = 255
    out = np.asarray(base_img, np.float32) * (1 - 0.6 * h) + red * 0.6 * h
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def save_heatmaps(path: str, pixels_1xIxYxXxC: np.ndarray, result: AttentionMap) -> None:
    """One PNG: each image with its heatmap, side by side."""
    from PIL import Image

    tiles = [heatmap_image(p, m) for p, m in zip(pixels_1xIxYxXxC[0], result.maps_IxGxG, strict=True)]
    out = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height))
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width
    out.save(path)
