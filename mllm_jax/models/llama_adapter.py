"""LLaMA-Adapter (Zhang et al. 2023), multimodal: a LLaMA decoder whose top ``adapter_layers`` layers
also attend to ``adapter_len`` learnable adaption prompts, that attention scaled by a zero-initialised
per-head gate (``tanh(gate)``, as the multimodal release), and the projected global CLIP feature of the
sample's image added to every prompt. The prompts' keys and values come from the layer's own (frozen)
``k_proj`` / ``v_proj``, without RoPE; their softmax is separate from the tokens' own, so with the gates
at zero the model is the base LLaMA exactly.

Images do not become tokens: the sample's one ``<image>`` token (a plain, learned token) marks that it
has an image, and ``decode`` reads the image as ``media`` (``[B, M, D]``, one projected feature per
image, M <= 1) with the mask of which tokens see it (``xattn.latest_image_mask``), as Flamingo's media
are read; so ``generate`` drives it like IDEFICS.

Params: ``vision`` (the CLIP tower), ``adapter`` (``prompts [L, K, D]``, ``gates [L, N]``,
``visual_proj`` + ``visual_norm``: the global feature into the LLM's width) and ``llm`` (exactly
``Llm``'s tree, so the base exports as a HF LlamaForCausalLM).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import (
    Block,
    Dense,
    GatedMlp,
    LayerNorm,
    Part,
    RMSNorm,
    Stack,
    attention,
    constrain,
    maybe_remat,
    merge_heads,
)
from mllm_jax.models.llm import (
    Decoder,
    DecoderLayer,
    LlmConfig,
    apply_rope,
    chunk_mask,
    rope_inv_freq,
    token_table,
    write_cache,
)
from mllm_jax.models.mllm import MultimodalLM, per_image
from mllm_jax.models.vit import VisionTower, VitConfig
from mllm_jax.models.xattn import latest_image_mask

# the global feature's parts, concatenated in this order: "class" (CLIP's pooled output, the post-LN class
# token), "mean" / "max" (over the last layer's patch tokens: the mean keeps how much of the image the
# objects cover, the max whether any patch holds a feature, its gradient reaching that patch alone)
POOLINGS = {
    "class": ("class",),
    "mean": ("mean",),
    "max": ("max",),
    "concat": ("class", "mean"),
    "concat_max": ("class", "mean", "max"),
}


@dataclasses.dataclass(frozen=True)
class LlamaAdapterConfig:
    vision: VitConfig = VitConfig()
    llm: LlmConfig = LlmConfig()
    adapter_len: int = 10  # K adaption prompts per adapted layer (LLaMA-Adapter: 10)
    adapter_layers: int = 2  # the top L decoder layers get prompts (LLaMA-Adapter on 7B: 30 of 32)
    image_token_id: int = 255  # marks a sample's image (one plain token, not a block of features)
    eod_token_id: int | None = None  # hides the image from the tokens after it (packed documents)
    # LLaMA-Adapter starts the gates at 0 (the base model exactly); a model trained from nothing may
    # start them open a little (as configs/flamingo.py:tiny does its tanh gates)
    gate_init: float = 0.0
    # the global feature (POOLINGS): one pooling or several concatenated, as LLaMA-Adapter concatenates
    # several global features before projecting
    pooling: str = "class"

    @property
    def first_adapted(self) -> int:
        return self.llm.num_layers - self.adapter_layers

    def validate(self):
        self.vision.validate()
        self.llm.validate()
        if not 1 <= self.adapter_layers <= self.llm.num_layers:
            raise ValueError(
                f"adapter_layers must be in [1, {self.llm.num_layers}] (the decoder's layers), "
                f"got {self.adapter_layers}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {tuple(POOLINGS)}, got {self.pooling!r}")
        if self.adapter_len < 1:
            raise ValueError(f"adapter_len must be >= 1, got {self.adapter_len}")


class AdaptedAttention(Block):
    """``LlmAttention`` (same params, same numbers) plus the gated attention to the layer's prompts."""

    config: LlmConfig

    @nn.compact
    def __call__(
        self, x_BxTxD, positions_BxT, mask_Bx1xTxS, prompts_BxKxD, gate_N, cache=None, cache_index_B=None
    ):
        c = self.config

        def proj(name, n, axes):
            dense = Dense(n * c.head_dim, axes, c.qkv_bias, self.dtype, name=name)
            return lambda x: dense(x).reshape(*x.shape[:-1], n, c.head_dim)

        q_proj = proj("q_proj", c.num_heads, ("embed", "heads"))
        k_proj = proj("k_proj", c.num_kv_heads, ("embed", "kv_heads"))
        v_proj = proj("v_proj", c.num_kv_heads, ("embed", "kv_heads"))
        inv_freq = rope_inv_freq(c)
        q = apply_rope(q_proj(x_BxTxD), positions_BxT, inv_freq)
        k = apply_rope(k_proj(x_BxTxD), positions_BxT, inv_freq)
        v = v_proj(x_BxTxD)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if cache is not None:
            cache = k, v = write_cache(cache, k, v, cache_index_B)
        out = attention(q, k, v, mask_Bx1xTxS, self.dtype, cache is None, c.sliding_window, self.attention)
        # the prompts: their own softmax over K (no mask, no RoPE: they sit at no position)
        prompt_k_BxKxKvxH, prompt_v_BxKxKvxH = k_proj(prompts_BxKxD), v_proj(prompts_BxKxD)
        prompt_k_BxKxKvxH = jnp.broadcast_to(prompt_k_BxKxKvxH, (q.shape[0], *prompt_k_BxKxKvxH.shape[1:]))
        prompt_v_BxKxKvxH = jnp.broadcast_to(prompt_v_BxKxKvxH, (q.shape[0], *prompt_v_BxKxKvxH.shape[1:]))
        prompt_out_BxTxNxH = attention(q, prompt_k_BxKxKvxH, prompt_v_BxKxKvxH, None, self.dtype)
        out = out + jnp.tanh(gate_N).astype(out.dtype)[:, None] * prompt_out_BxTxNxH
        return merge_heads(out, "o_proj", c.hidden_size, c.o_bias, self.dtype), cache


class AdaptedDecoderLayer(Block):
    """``DecoderLayer`` with ``AdaptedAttention``: the same param tree."""

    config: LlmConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask, prompts_BxKxD, gate_N, cache=None, cache_index_B=None):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x_BxTxD)
        attn = AdaptedAttention(c, self.dtype, self.attention, name="self_attn")
        h, cache = attn(h, positions_BxT, mask, prompts_BxKxD, gate_N, cache, cache_index_B)
        x_BxTxD = x_BxTxD + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x_BxTxD)
        x_BxTxD = x_BxTxD + GatedMlp(c.intermediate_size, c.act, c.mlp_bias, self.dtype, name="mlp")(h)
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed")), cache


class AdaptedLlm(Decoder):
    """``Llm``'s params and numbers; layers ``first_adapted..`` take their prompts and gates."""

    config: LlamaAdapterConfig

    def setup(self):
        c, lc = self.config, self.config.llm
        self.embed_tokens = token_table(lc.vocab_size, lc.hidden_size, self.dtype)
        plain = maybe_remat(DecoderLayer, self.remat)
        adapted = maybe_remat(AdaptedDecoderLayer, self.remat)
        self.layers = [
            (plain if i < c.first_adapted else adapted)(lc, self.dtype, self.attention, name=f"layers_{i}")
            for i in range(lc.num_layers)
        ]
        self.norm = RMSNorm(lc.rms_norm_eps, self.dtype)
        if not lc.tie_embeddings:
            self.lm_head = Dense(lc.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)

    def embed(self, tokens_BxT, images=None):
        del images
        x = self.embed_tokens(jnp.clip(tokens_BxT, 0, self.config.llm.vocab_size - 1))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))

    def head(self, x_BxTxD):
        lc = self.config.llm
        logits = self.embed_tokens.attend(x_BxTxD) if lc.tie_embeddings else self.lm_head(x_BxTxD)
        return constrain(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, embeds_BxTxD, positions_BxT, mask, prompts_LxBxKxD, gates_LxN, cache, cache_index_B):
        c = self.config
        x = embeds_BxTxD.astype(self.dtype)
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if i < c.first_adapted:
                x, layer_cache = layer(x, positions_BxT, mask, layer_cache, cache_index_B)
            else:
                j = i - c.first_adapted
                x, layer_cache = layer(
                    x, positions_BxT, mask, prompts_LxBxKxD[j], gates_LxN[j], layer_cache, cache_index_B
                )
            new_cache.append(layer_cache)
        return self.head(self.norm(x)), (None if cache is None else tuple(new_cache))


class AdaptionPrompts(Part):
    """The ``adapter`` collection: prompts, gates, and the global image feature's projection."""

    config: LlamaAdapterConfig

    def setup(self):
        c = self.config
        d, n = c.llm.hidden_size, c.llm.num_heads
        # N(0, 1) as LLaMA-Adapter's nn.Embedding: the scale of the normed hidden states k/v_proj read
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None, "embed"))
        self.prompts = self.param("prompts", init, (c.adapter_layers, c.adapter_len, d))
        gate_init = nn.with_logical_partitioning(nn.initializers.constant(c.gate_init), (None, None))
        self.gates = self.param("gates", gate_init, (c.adapter_layers, n))
        self.visual_proj = Dense(d, (None, "embed"), dtype=self.dtype)
        self.visual_norm = LayerNorm(dtype=self.dtype)

    def visual(self, pooled_BxE):
        """The global image features ``[B, E]`` in the LLM's width ``[B, D]``."""
        return self.visual_norm(self.visual_proj(pooled_BxE))

    def __call__(self, visual_BxD=None):
        """``(prompts [L, B, K, D] (B = 1 without an image), gates [L, N])``."""
        prompts_LxBxKxD = self.prompts[:, None].astype(self.dtype)
        if visual_BxD is not None:
            prompts_LxBxKxD = prompts_LxBxKxD + visual_BxD[None, :, None].astype(self.dtype)
        return prompts_LxBxKxD, self.gates


class LlamaAdapter(MultimodalLM, Stack):
    """``__call__(tokens, images, ...) -> (logits_BxTxV, cache)``; at most one image per sample. The KV
    cache is ``Llm``'s (``init_cache(config.llm, ...)``): the prompts' keys and values are recomputed
    from ``media`` each step (K rows per adapted layer). No layer scan."""

    config: LlamaAdapterConfig

    def setup(self):
        c = self.config
        self.vision = VisionTower(c.vision, self.dtype, self.remat, attention=self.attention)
        self.adapter = AdaptionPrompts(c, self.dtype)
        self.llm = AdaptedLlm(c, self.dtype, self.remat, attention=self.attention)

    def media(self, images_BxIxYxXxC):
        """Pixels ``[B, I, Y, X, C]`` -> each image's projected global (pooled CLIP) feature ``[B, I, D]``."""
        b, i = images_BxIxYxXxC.shape[:2]
        if i > 1:
            raise ValueError(f"LLaMA-Adapter reads one image per sample, got {i}")
        hidden_states, class_BIxE = self.vision(per_image(images_BxIxYxXxC))
        patches_BIxPxE = hidden_states[-1][:, int(self.config.vision.class_token) :]
        parts = {"class": class_BIxE, "mean": patches_BIxPxE.mean(axis=1), "max": patches_BIxPxE.max(axis=1)}
        pooled_BIxE = jnp.concatenate([parts[k] for k in POOLINGS[self.config.pooling]], axis=-1)
        return self.adapter.visual(pooled_BIxE).reshape(b, i, -1)

    def embed(self, tokens_BxT, images_BxIxYxXxC=None):
        """Token embeddings only: the image reaches the layers through the prompts (``decode``)."""
        del images_BxIxYxXxC
        return self.llm.embed(tokens_BxT)

    def inputs(self, tokens_BxT, images_BxIxYxXxC=None, image_mask_BxTxM=None):
        media = None
        if images_BxIxYxXxC is not None and images_BxIxYxXxC.shape[1] > 0:
            media = self.media(images_BxIxYxXxC)
            if image_mask_BxTxM is None:
                c = self.config
                image_mask_BxTxM = latest_image_mask(
                    tokens_BxT, c.image_token_id, media.shape[1], c.eod_token_id
                )
        return self.embed(tokens_BxT), (media, image_mask_BxTxM)

    def decode(
        self,
        embeds_BxTxD,
        positions_BxT=None,
        attention_mask_BxT=None,
        cache=None,
        cache_index_B=None,
        *media,
    ):
        """As ``Llm.__call__`` (same cache and mask rules), plus ``media``: ``(media_BxMxD,
        media_mask_BxTxM)``. A sample whose chunk sees its image gets the image's feature added to the
        prompts; no media (or a sample without an image): the prompts alone."""
        c = self.config
        media_BxMxD, media_mask_BxTxM = (*media, None, None)[:2]
        b, t, _ = embeds_BxTxD.shape
        if self.is_initializing():  # init from embeddings alone must still create every parameter
            self.embed(jnp.zeros((1, 1), jnp.int32))
            if media_BxMxD is None:
                v = c.vision
                self.media(jnp.zeros((1, 1, v.image_size, v.image_size, v.num_channels)))
        visual_BxD = None
        if media_BxMxD is not None and media_BxMxD.shape[1] > 0:
            seen_B = jnp.ones((b,), bool) if media_mask_BxTxM is None else media_mask_BxTxM[:, :, 0].any(1)
            visual_BxD = jnp.where(seen_B[:, None], media_BxMxD[:, 0], 0)
        prompts_LxBxKxD, gates_LxN = self.adapter(visual_BxD)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = chunk_mask(b, t, attention_mask_BxT, cache, cache_index_B, c.llm.sliding_window)
        return self.llm(embeds_BxTxD, positions_BxT, mask, prompts_LxBxKxD, gates_LxN, cache, cache_index_B)
