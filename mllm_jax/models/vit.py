"""Vision transformers: CLIP (class token, pre-LN) and SigLIP (no class token, MAP head) towers.

One module covers both; the differences are config switches with the HF names in comments, so the
parameter tree mirrors ``CLIPVisionModel`` / ``SiglipVisionModel`` one to one (see ``mllm_jax.hf``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import Dense, LayerNorm, activation, attention, constrain, maybe_remat
from mllm_jax.models.scan import scanned


@dataclasses.dataclass(frozen=True)
class VitConfig:
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    class_token: bool = True  # CLIP: True; SigLIP: False
    pre_norm: bool = True  # CLIP's `pre_layrnorm`
    patch_bias: bool = False  # CLIP's patch conv has no bias, SigLIP's has
    pooling_head: bool = False  # SigLIP's multihead-attention pooling head (`vision_use_head`)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.class_token)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")


class VitAttention(nn.Module):
    config: VitConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        b, t, _ = x_BxTxD.shape
        proj = lambda name, axes: Dense(c.hidden_size, axes, dtype=self.dtype, name=name)  # noqa: E731
        q = proj("q_proj", ("embed", "heads"))(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
        k = proj("k_proj", ("embed", "heads"))(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
        v = proj("v_proj", ("embed", "heads"))(x_BxTxD).reshape(b, t, c.num_heads, c.head_dim)
        out = attention(q, k, v, dtype=self.dtype).reshape(b, t, c.hidden_size)
        return proj("out_proj", ("heads", "embed"))(out)


class VitMlp(nn.Module):
    config: VitConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = Dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = constrain(activation(c.act)(h), ("act_batch", "act_seq", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class VitLayer(nn.Module):
    config: VitConfig
    dtype: jnp.dtype = jnp.float32
    scan_output: bool = False  # under nn.scan: return the output as carry and as per-layer output
    ATTENTION = VitAttention  # class attribute, not a field: EVA's layer swaps in its fused-qkv attention

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        ln = lambda name: LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x_BxTxD = x_BxTxD + self.ATTENTION(c, self.dtype, name="self_attn")(ln("layer_norm1")(x_BxTxD))
        x_BxTxD = x_BxTxD + VitMlp(c, self.dtype, name="mlp")(ln("layer_norm2")(x_BxTxD))
        x_BxTxD = constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed"))
        return (x_BxTxD, x_BxTxD) if self.scan_output else x_BxTxD


class PoolingHead(nn.Module):
    """SigLIP's multihead-attention pooling: one learned probe attends over all patches."""

    config: VitConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        b, t, d = x_BxTxD.shape
        probe = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None, "embed")),
            (1, 1, d),
        )
        probe_Bx1xD = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        q = Dense(d, ("embed", "heads"), dtype=self.dtype, name="q_proj")(probe_Bx1xD)
        k = Dense(d, ("embed", "heads"), dtype=self.dtype, name="k_proj")(x_BxTxD)
        v = Dense(d, ("embed", "heads"), dtype=self.dtype, name="v_proj")(x_BxTxD)
        split = lambda y: y.reshape(b, y.shape[1], c.num_heads, c.head_dim)  # noqa: E731
        h = attention(split(q), split(k), split(v), dtype=self.dtype).reshape(b, 1, d)
        h = Dense(d, ("heads", "embed"), dtype=self.dtype, name="out_proj")(h)
        h = h + VitMlp(c, self.dtype, name="mlp")(
            LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layernorm")(h)
        )
        return h[:, 0]


class VisionTower(nn.Module):
    """Pixels ``[B, H, W, C]`` (normalised, channels last) -> hidden states.

    Returns ``(hidden_states, pooled)``: ``hidden_states`` is a tuple of ``num_layers + 1`` arrays
    ``[B, T, D]`` exactly as HF's ``output_hidden_states`` (index 0 = embeddings after ``pre_layrnorm``),
    so ``vision_feature_layer=-2`` means the same thing here and there. Under jit, layers whose outputs
    are unused (e.g. the last one for layer -2) are dead code and get removed by XLA.
    """

    config: VitConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # a layers.REMAT_POLICIES name
    scan_layers: bool = False  # one nn.scan over the layers (params stacked under "layers")

    @nn.compact
    def __call__(self, pixels_BxHxWxC):
        c = self.config
        b = pixels_BxHxWxC.shape[0]
        patches = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=c.patch_bias,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(pixels_BxHxWxC.astype(self.dtype))
        x_BxTxD = patches.reshape(b, -1, c.hidden_size)
        if c.class_token:
            cls = self.param(
                "class_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (c.hidden_size,),
            )
            cls_Bx1xD = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
            x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxTxD], axis=1)
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.num_positions, c.hidden_size),
        )
        if x_BxTxD.shape[1] != c.num_positions:
            raise ValueError(
                f"image of {pixels_BxHxWxC.shape[1:3]} gives {x_BxTxD.shape[1]} tokens; the tower expects "
                f"{c.image_size}x{c.image_size} images ({c.num_positions} tokens)"
            )
        x_BxTxD = x_BxTxD + pos.astype(self.dtype)[None]
        if c.pre_norm:
            x_BxTxD = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x_BxTxD)
        x_BxTxD = constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed"))
        hidden_states = [x_BxTxD]
        layer = maybe_remat(VitLayer, self.remat)
        if self.scan_layers:
            scan = scanned(layer, c.num_layers, ())(c, self.dtype, scan_output=True, name="layers")
            x_BxTxD, stacked_LxBxTxD = scan(x_BxTxD)
            hidden_states += [stacked_LxBxTxD[i] for i in range(c.num_layers)]
        else:
            for i in range(c.num_layers):
                x_BxTxD = layer(c, self.dtype, name=f"layers_{i}")(x_BxTxD)
                hidden_states.append(x_BxTxD)
        post_ln = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")
        if c.pooling_head:  # SigLIP: post-LN on all tokens, then attention pooling
            pooled = PoolingHead(c, self.dtype, name="head")(post_ln(x_BxTxD))
        elif c.class_token:  # CLIP: post-LN on the class token only
            pooled = post_ln(x_BxTxD[:, 0])
        else:
            pooled = post_ln(x_BxTxD).mean(axis=1)
        return tuple(hidden_states), pooled


def select_features(hidden_states, layers, drop_cls: bool):
    """LLaVA's feature selection: ``layers`` (ints, negative from the end) concatenated on the last dim."""
    feats = [hidden_states[i][:, 1:] if drop_cls else hidden_states[i] for i in layers]
    return jnp.concatenate(feats, axis=-1) if len(feats) > 1 else feats[0]
