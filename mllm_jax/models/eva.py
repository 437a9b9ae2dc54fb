"""EVA ViT as BLIP-2 / InstructBLIP use it (HF ``Blip2VisionModel``, ``InstructBlipVisionModel``).

Differs from the CLIP tower in ``vit.py`` enough to be its own module: a fused ``qkv`` projection,
an output ``projection``, a patch conv with bias, a ``[1, P, D]`` position parameter instead of an
embedding table, and no pre-norm. Parameter names mirror HF one to one (see ``mllm_jax.hf.eva``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models.layers import (
    Block,
    Dense,
    LayerNorm,
    ScanStack,
    activation,
    attention,
    constrain,
)
from mllm_jax.models.vit import TowerConfig, VitLayer, check_positions, embed_patches, run_tower


@dataclasses.dataclass(frozen=True)
class EvaConfig(TowerConfig):
    act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # the class token

    def validate(self):
        super().validate()
        activation(self.act)


class EvaAttention(Block):
    config: EvaConfig

    @nn.compact
    def __call__(self, x_BxPxD):
        c = self.config
        b, p, d = x_BxPxD.shape
        # One fused projection as HF stores it. The original EVA learns q and v biases only; HF keeps a
        # full [3D] bias whose k third starts at zero but is a free parameter, so ours is one too.
        qkv_BxPx3D = Dense(3 * d, ("embed", "heads"), c.qkv_bias, self.dtype, name="qkv")(x_BxPxD)
        # HF layout of the fused output: [3, heads, head_dim] along the last axis.
        qkv_BxPx3xNxH = qkv_BxPx3D.reshape(b, p, 3, c.num_heads, c.head_dim)
        q, k, v = qkv_BxPx3xNxH[:, :, 0], qkv_BxPx3xNxH[:, :, 1], qkv_BxPx3xNxH[:, :, 2]
        out = attention(q, k, v, dtype=self.dtype, kernel=self.attention).reshape(b, p, d)
        return Dense(d, ("heads", "embed"), dtype=self.dtype, name="projection")(out)


class EvaLayer(VitLayer):
    """A pre-LN ViT layer (same MLP, norms and param names as CLIP's) with EVA's fused-qkv attention."""

    ATTENTION = EvaAttention


class EvaTower(ScanStack):
    """Pixels ``[B, Y, X, C]`` (normalised, channels last) -> ``(hidden_states, last_BxPxD)``.

    ``hidden_states`` is a tuple of ``num_layers + 1`` arrays ``[B, P, D]`` as HF's
    ``output_hidden_states`` (index 0 = patch + class + position embeddings). ``last_BxPxD`` is the
    post-layernormed last layer, HF's ``last_hidden_state``: what BLIP-2 feeds the Q-Former.
    """

    config: EvaConfig

    @nn.compact
    def __call__(self, pixels_BxYxXxC):
        c = self.config
        b = pixels_BxYxXxC.shape[0]
        x_BxPxD = embed_patches(c, pixels_BxYxXxC, True, self.dtype)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, 1, c.hidden_size),
        )
        cls_Bx1xD = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
        x_BxPxD = jnp.concatenate([cls_Bx1xD, x_BxPxD], axis=1)
        check_positions(c, pixels_BxYxXxC, x_BxPxD)
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, c.num_positions, c.hidden_size),
        )
        x_BxPxD = constrain(x_BxPxD + pos.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        x_BxPxD, hidden_states = run_tower(self, EvaLayer, x_BxPxD)
        last_BxPxD = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x_BxPxD)
        return hidden_states, last_BxPxD
