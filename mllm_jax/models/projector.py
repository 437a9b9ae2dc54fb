"""Vision-to-LLM projectors: linear, or an N-layer MLP (LLaVA-1.5's ``mlp2x_gelu`` is depth 2, gelu)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from mllm_jax.models.layers import Dense, Part, activation, constrain


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    in_features: int = 64
    out_features: int = 64
    depth: int = 2  # 1 = linear
    act: str = "gelu"
    bias: bool = True

    def validate(self):
        if self.depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {self.depth}")
        activation(self.act)


class Projector(Part):
    """``[..., in_features] -> [..., out_features]``; layers named ``linear_1..N`` as in HF LLaVA."""

    config: ProjectorConfig

    @nn.compact
    def __call__(self, x_BxPxE):
        c = self.config
        # Pin the input's layout too: left to infer it, XLA's SPMD partitioner (jax 0.10.2, XLA:CPU)
        # computed the wrong rows for the batch shards with data != fsdp on data=2,fsdp=2,tensor=2
        # (the kernel's out-dim is on fsdp, which also splits the batch).
        h = constrain(x_BxPxE, ("act_batch", "act_seq", "act_embed"))
        for i in range(1, c.depth + 1):
            # in-dim on the tensor axis, out-dim on fsdp: a logical name may not repeat within one kernel
            h = Dense(c.out_features, ("mlp", "embed"), c.bias, self.dtype, name=f"linear_{i}")(h)
            if i < c.depth:
                h = activation(c.act)(h)
        return constrain(h, ("act_batch", "act_seq", "act_embed"))
