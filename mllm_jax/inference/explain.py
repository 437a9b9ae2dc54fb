"""Attention maps: where an answer's tokens looked in the image.

For models whose image features are tokens of the LLM's sequence, one per vision patch (LLaVA), the map
is the LLM's self-attention from the answer's tokens onto each image's tokens: one forward pass over the
prompt and the answer (no cache), the layers' query and key projections captured, and the attention
probabilities recomputed as the decoder computes them (RoPE, grouped-query heads, causal mask, softmax in
f32). The map averages the answer's tokens and the heads, and the layers or one chosen layer.
(Flamingo's gated cross-attention and BLIP-2's Q-Former have no patch tokens in the sequence: not here.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import families
from mllm_jax.errors import UsageError
from mllm_jax.inference.generate import llm_config
from mllm_jax.models.llm import apply_rope, rope_inv_freq


@dataclasses.dataclass
class AttentionMap:
    maps_IxGxG: np.ndarray  # per image, the patch grid's share of the answer's attention (sums to <= 1)
    per_layer_LxIxGxG: np.ndarray  # the same, one map per layer
    image_attention_LxNxAxS: np.ndarray  # per layer and head: answer queries x image-token keys


def _captured(model, params, tokens_1xT, images):
    """Run the model over ``tokens`` (no cache) and keep its LLM layers' q/k projections."""

    def wanted(module, method):
        return method == "__call__" and module.name in ("q_proj", "k_proj") and "llm" in module.path

    _, state = model.apply(
        {"params": params}, tokens_1xT, images, capture_intermediates=wanted, mutable=["intermediates"]
    )
    return state["intermediates"]["llm"]


def attention_onto_images(model, params, prompt: list[int], answer: list[int], pixels) -> np.ndarray:
    """Self-attention probabilities ``[L, N, A, T]`` of the answer's tokens (queries: the positions that
    predicted them) over the whole sequence, for a model that splices image tokens into it."""
    c = llm_config(model)
    tokens = np.asarray([prompt + answer[:-1]], np.int32)  # the last answer token is never a query
    t, a = tokens.shape[1], len(answer)
    layers = _captured(model, params, jnp.asarray(tokens), jnp.asarray(pixels))
    inv_freq = rope_inv_freq(c)
    positions = jnp.arange(t)[None]
    out = []
    for i in range(c.num_layers):
        proj = layers[f"layers_{i}"]["self_attn"]
        q = proj["q_proj"]["__call__"][0].reshape(1, t, c.num_heads, c.head_dim)
        k = proj["k_proj"]["__call__"][0].reshape(1, t, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k = jnp.repeat(k, c.num_heads // c.num_kv_heads, axis=2)
        q_NxAxH = q[0, t - a :].transpose(1, 0, 2).astype(jnp.float32)
        scores_NxAxT = jnp.einsum("nah,tnh->nat", q_NxAxH, k[0].astype(jnp.float32)) / np.sqrt(c.head_dim)
        causal_AxT = jnp.arange(t)[None, :] <= jnp.arange(t - a, t)[:, None]
        if c.sliding_window:
            causal_AxT &= jnp.arange(t - a, t)[:, None] - jnp.arange(t)[None, :] < c.sliding_window
        scores_NxAxT = jnp.where(causal_AxT, scores_NxAxT, -jnp.inf)
        out.append(jax.nn.softmax(scores_NxAxT, axis=-1))
    return np.asarray(jnp.stack(out))


def patch_tokens(model, prompt: list[int], pixels) -> tuple[np.ndarray, int, int]:
    """Where the image tokens are (``(positions, tokens per image, patch grid side)``), or a one-line
    ``UsageError`` for a model whose image tokens are not one per patch (checked before decoding)."""
    cfg, v = model.config, families.of_module(model).vision_config(model.config)
    is_image = np.asarray(prompt) == getattr(cfg, "image_token_id", None)
    n_images = 0 if pixels is None else pixels.shape[1]
    grid = v.image_size // v.patch_size if v is not None else 0
    per_image = int(is_image.sum()) // max(n_images, 1)
    if n_images == 0 or not is_image.any() or per_image not in (grid * grid, grid * grid + 1):
        raise UsageError(
            "--explain needs a model whose image features are tokens of the sequence, one per patch "
            "(LLaVA); this model's images reach the LLM otherwise"
        )
    return np.flatnonzero(is_image), per_image, grid


def explain(
    model, params, prompt: list[int], answer: list[int], pixels, layer: int | None = None
) -> AttentionMap:
    """The answer's attention onto each image's patch grid (module docstring); ``layer``: one layer's
    map (an index, negative from the end) instead of the layers' mean."""
    if not answer:
        raise UsageError("--explain needs at least one generated token")
    image_cols, per_image, grid = patch_tokens(model, prompt, pixels)
    n_images = pixels.shape[1]
    probs_LxNxAxT = attention_onto_images(model, params, prompt, answer, pixels)
    num_layers = probs_LxNxAxT.shape[0]
    if layer is not None and not -num_layers <= layer < num_layers:
        raise UsageError(f"--explain_layer={layer}: the LLM has {num_layers} layers")
    onto_LxNxAxS = probs_LxNxAxT[..., image_cols]
    per_layer = onto_LxNxAxS.mean(axis=(1, 2)).reshape(num_layers, n_images, per_image)
    per_layer = per_layer[..., per_image - grid * grid :]  # a class token's feature has no place
    per_layer = per_layer.reshape(num_layers, n_images, grid, grid)
    maps = per_layer.mean(axis=0) if layer is None else per_layer[layer]
    return AttentionMap(maps, per_layer, onto_LxNxAxS)


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
