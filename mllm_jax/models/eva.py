"""EVA ViT as BLIP-2 / InstructBLIP use it (HF ``Blip2VisionModel``, ``InstructBlipVisionModel``).

Differs from the CLIP tower in ``vit.py`` enough to be its own module: a fused ``qkv`` projection,
an output ``projection``, a patch conv with bias, a ``[1, T, D]`` position parameter instead of an
embedding table, and no pre-norm. Parameter names mirror HF one to one (see ``mllm_jax.hf.eva``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import Dense, LayerNorm, activation, attention, constrain, maybe_remat
from mllm_jax.models.scan import scanned
from mllm_jax.models.vit import VitLayer


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # the class token

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
        activation(self.act)


class EvaAttention(nn.Module):
    config: EvaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        b, t, d = x_BxTxD.shape
        # One fused projection as HF stores it. The original EVA learns q and v biases only; HF keeps a
        # full [3D] bias whose k third starts at zero but is a free parameter, so ours is one too.
        qkv_Bx3D = Dense(3 * d, ("embed", "heads"), c.qkv_bias, self.dtype, name="qkv")(x_BxTxD)
        # HF layout of the fused output: [3, heads, head_dim] along the last axis.
        qkv_BxTx3xNxH = qkv_Bx3D.reshape(b, t, 3, c.num_heads, c.head_dim)
        q, k, v = qkv_BxTx3xNxH[:, :, 0], qkv_BxTx3xNxH[:, :, 1], qkv_BxTx3xNxH[:, :, 2]
        out = attention(q, k, v, dtype=self.dtype).reshape(b, t, d)
        return Dense(d, ("heads", "embed"), dtype=self.dtype, name="projection")(out)


class EvaLayer(VitLayer):
    """A pre-LN ViT layer (same MLP, norms and param names as CLIP's) with EVA's fused-qkv attention."""

    ATTENTION = EvaAttention


class EvaTower(nn.Module):
    """Pixels ``[B, H, W, C]`` (normalised, channels last) -> ``(hidden_states, last_BxTxD)``.

    ``hidden_states`` is a tuple of ``num_layers + 1`` arrays ``[B, T, D]`` as HF's
    ``output_hidden_states`` (index 0 = patch + class + position embeddings). ``last_BxTxD`` is the
    post-layernormed last layer, HF's ``last_hidden_state``: what BLIP-2 feeds the Q-Former.
    """

    config: EvaConfig
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
            use_bias=True,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(pixels_BxHxWxC.astype(self.dtype))
        x_BxTxD = patches.reshape(b, -1, c.hidden_size)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, 1, c.hidden_size),
        )
        cls_Bx1xD = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
        x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxTxD], axis=1)
        if x_BxTxD.shape[1] != c.num_positions:
            raise ValueError(
                f"image of {pixels_BxHxWxC.shape[1:3]} gives {x_BxTxD.shape[1]} tokens; the tower expects "
                f"{c.image_size}x{c.image_size} images ({c.num_positions} tokens)"
            )
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, c.num_positions, c.hidden_size),
        )
        x_BxTxD = constrain(x_BxTxD + pos.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        hidden_states = [x_BxTxD]
        layer = maybe_remat(EvaLayer, self.remat)
        if self.scan_layers:
            scan = scanned(layer, c.num_layers, ())(c, self.dtype, scan_output=True, name="layers")
            x_BxTxD, stacked_LxBxTxD = scan(x_BxTxD)
            hidden_states += [stacked_LxBxTxD[i] for i in range(c.num_layers)]
        else:
            for i in range(c.num_layers):
                x_BxTxD = layer(c, self.dtype, name=f"layers_{i}")(x_BxTxD)
                hidden_states.append(x_BxTxD)
        last_BxTxD = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x_BxTxD)
        return tuple(hidden_states), last_BxTxD
