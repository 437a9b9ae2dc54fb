"""Vision transformers: CLIP (class token, pre-LN) and SigLIP (no class token, MAP head) towers.

One module covers both; the differences are config switches with the HF names in comments, so the
parameter tree mirrors ``CLIPVisionModel`` / ``SiglipVisionModel`` one to one (see ``mllm_jax.hf``).
The patch embedding, the pre-LN layer and the layer loop are shared with EVA's tower (``eva.py``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import (
    AttentionKernel,
    Block,
    EncoderDims,
    LayerNorm,
    Mlp,
    ScanStack,
    attention,
    constrain,
    maybe_remat,
    merge_heads,
    split_heads,
)
from mllm_jax.models.scan import layer_stack


@dataclasses.dataclass(frozen=True)
class TowerConfig(EncoderDims):
    """The fields and checks every ViT tower has (``VitConfig``, EVA's ``EvaConfig``)."""

    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self):
        self.check_heads("vision")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")


@dataclasses.dataclass(frozen=True)
class VitConfig(TowerConfig):
    class_token: bool = True  # CLIP: True; SigLIP: False
    pre_norm: bool = True  # CLIP's `pre_layrnorm`
    patch_bias: bool = False  # CLIP's patch conv has no bias, SigLIP's has
    pooling_head: bool = False  # SigLIP's multihead-attention pooling head (`vision_use_head`)
    # Init scale of the position embeddings (HF: 0.02). Init only. A tower trained from scratch keeps them
    # far below the patches' content, so position barely reaches a set reader such as the Perceiver
    # resampler (docs/flamingo.md); tiny Flamingo starts them larger.
    position_init_std: float = 0.02

    def validate(self):
        super().validate()
        if self.position_init_std < 0:
            raise ValueError(f"vision position_init_std must be >= 0, got {self.position_init_std}")

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.class_token)


class VitAttention(Block):
    config: VitConfig

    @nn.compact
    def __call__(self, x_BxPxD):
        c = self.config
        heads = lambda name: split_heads(x_BxPxD, name, c.num_heads, c.head_dim, True, self.dtype)  # noqa: E731
        out = attention(
            heads("q_proj"), heads("k_proj"), heads("v_proj"), dtype=self.dtype, kernel=self.attention
        )
        return merge_heads(out, "out_proj", c.hidden_size, True, self.dtype)


class VitLayer(nn.Module):
    config: VitConfig
    dtype: jnp.dtype = jnp.float32
    scan_output: bool = False  # under nn.scan: return the output as carry and as per-layer output
    attention: AttentionKernel = AttentionKernel()
    ATTENTION = VitAttention  # class attribute, not a field: EVA's layer swaps in its fused-qkv attention

    @nn.compact
    def __call__(self, x_BxPxD):
        c = self.config
        ln = lambda name: LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        attn = self.ATTENTION(c, self.dtype, self.attention, name="self_attn")
        x_BxPxD = x_BxPxD + attn(ln("layer_norm1")(x_BxPxD))
        x_BxPxD = x_BxPxD + Mlp(c.intermediate_size, c.act, dtype=self.dtype, name="mlp")(
            ln("layer_norm2")(x_BxPxD)
        )
        x_BxPxD = constrain(x_BxPxD, ("act_batch", "act_seq", "act_embed"))
        return (x_BxPxD, x_BxPxD) if self.scan_output else x_BxPxD


class PoolingHead(Block):
    """SigLIP's multihead-attention pooling: one learned probe attends over all patches."""

    config: VitConfig

    @nn.compact
    def __call__(self, x_BxPxD):
        c = self.config
        b, _, d = x_BxPxD.shape
        probe = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None, "embed")),
            (1, 1, d),
        )
        probe_Bx1xD = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        heads = lambda name, x: split_heads(x, name, c.num_heads, c.head_dim, True, self.dtype)  # noqa: E731
        q, k, v = heads("q_proj", probe_Bx1xD), heads("k_proj", x_BxPxD), heads("v_proj", x_BxPxD)
        h = merge_heads(
            attention(q, k, v, dtype=self.dtype, kernel=self.attention), "out_proj", d, True, self.dtype
        )
        h = h + Mlp(c.intermediate_size, c.act, dtype=self.dtype, name="mlp")(
            LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layernorm")(h)
        )
        return h[:, 0]


def embed_patches(c: TowerConfig, pixels_BxYxXxC, use_bias: bool, dtype):
    """The patch conv (``patch_embedding``, in the calling module's scope): ``[B, num_patches, D]``."""
    patches = nn.Conv(
        c.hidden_size,
        (c.patch_size, c.patch_size),
        strides=(c.patch_size, c.patch_size),
        padding="VALID",
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="patch_embedding",
    )(pixels_BxYxXxC.astype(dtype))
    return patches.reshape(pixels_BxYxXxC.shape[0], -1, c.hidden_size)


def check_positions(c, pixels_BxYxXxC, x_BxPxD):
    if x_BxPxD.shape[1] != c.num_positions:
        raise ValueError(
            f"image of {pixels_BxYxXxC.shape[1:3]} gives {x_BxPxD.shape[1]} tokens; the tower expects "
            f"{c.image_size}x{c.image_size} images ({c.num_positions} tokens)"
        )


def run_tower(tower, layer_cls, x_BxPxD):
    """``tower``'s layers (``layer_cls``, a ``VitLayer``) over the embeddings ``x`` -> ``(x, hidden_states)``:
    the last layer's output and the ``num_layers + 1`` hidden states, embeddings first."""
    c = tower.config
    layer = maybe_remat(layer_cls, tower.remat)
    args = (c, tower.dtype, tower.scan_layers)  # scan_output: a scanned layer returns its output twice
    layers = layer_stack(layer, c.num_layers, tower.scan_layers, (), *args, attention=tower.attention)
    hidden_states = [x_BxPxD]
    if tower.scan_layers:
        x_BxPxD, stacked_LxBxPxD = layers(x_BxPxD)
        hidden_states += [stacked_LxBxPxD[i] for i in range(c.num_layers)]
    else:
        for layer in layers:
            x_BxPxD = layer(x_BxPxD)
            hidden_states.append(x_BxPxD)
    return x_BxPxD, tuple(hidden_states)


class VisionTower(ScanStack):
    """Pixels ``[B, Y, X, C]`` (normalised, channels last) -> hidden states.

    Returns ``(hidden_states, pooled)``: ``hidden_states`` is a tuple of ``num_layers + 1`` arrays
    ``[B, P, D]`` exactly as HF's ``output_hidden_states`` (index 0 = embeddings after ``pre_layrnorm``),
    so ``vision_feature_layer=-2`` means the same thing here and there. Under jit, layers whose outputs
    are unused (e.g. the last one for layer -2) are dead code and get removed by XLA.
    """

    config: VitConfig

    @nn.compact
    def __call__(self, pixels_BxYxXxC):
        c = self.config
        b = pixels_BxYxXxC.shape[0]
        x_BxPxD = embed_patches(c, pixels_BxYxXxC, c.patch_bias, self.dtype)
        if c.class_token:
            cls = self.param(
                "class_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (c.hidden_size,),
            )
            cls_Bx1xD = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
            x_BxPxD = jnp.concatenate([cls_Bx1xD, x_BxPxD], axis=1)
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(c.position_init_std), ("vocab", "embed")),
            (c.num_positions, c.hidden_size),
        )
        check_positions(c, pixels_BxYxXxC, x_BxPxD)
        x_BxPxD = x_BxPxD + pos.astype(self.dtype)[None]
        if c.pre_norm:
            x_BxPxD = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x_BxPxD)
        x_BxPxD = constrain(x_BxPxD, ("act_batch", "act_seq", "act_embed"))
        x_BxPxD, hidden_states = run_tower(self, VitLayer, x_BxPxD)
        post_ln = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")
        if c.pooling_head:  # SigLIP: post-LN on all tokens, then attention pooling
            pooled = PoolingHead(c, self.dtype, self.attention, name="head")(post_ln(x_BxPxD))
        elif c.class_token:  # CLIP: post-LN on the class token only
            pooled = post_ln(x_BxPxD[:, 0])
        else:
            pooled = post_ln(x_BxPxD).mean(axis=1)
        return hidden_states, pooled


def select_features(hidden_states, layers, drop_cls: bool):
    """LLaVA's feature selection: ``layers`` (ints, negative from the end) concatenated on the last dim."""
    feats = [hidden_states[i][:, 1:] if drop_cls else hidden_states[i] for i in layers]
    return jnp.concatenate(feats, axis=-1) if len(feats) > 1 else feats[0]
