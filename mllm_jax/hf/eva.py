"""Blip2VisionModel / InstructBlipVisionModel (EVA ViT) <-> ``EvaTower``.

Keys are relative to the vision model root (``embeddings.*``, ``encoder.layers.{i}.*``,
``post_layernorm.*``), as inside ``vision_model.`` of the BLIP-2 / InstructBLIP checkpoints.
transformers stores the attention bias fused (``self_attn.qkv.bias``, ``[3D]``), not as the original
EVA's separate ``q_bias`` / ``v_bias``.
"""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf.common import CONV, Rule, dense, dims_from_hf, dims_to_hf, ln
from mllm_jax.models.eva import EvaConfig

MODEL_TYPES = ("blip_2_vision_model", "instructblip_vision_model")
ALIASES = (("vision_model.", ""),)


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"non-square vision {name} {value} is not supported")
        value = value[0]
    return int(value)


def config_from_hf(d: dict) -> EvaConfig:
    model_type = d.get("model_type", MODEL_TYPES[0])
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"vision model_type {model_type!r} is not an EVA tower; supported: {MODEL_TYPES}"
        )
    return EvaConfig(
        **dims_from_hf(d, dict(hidden_size=1408, intermediate_size=6144, num_layers=39, num_heads=16)),
        image_size=_square(d.get("image_size", 224), "image_size"),
        patch_size=_square(d.get("patch_size", 14), "patch_size"),
        act=d.get("hidden_act", "gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6),
        qkv_bias=d.get("qkv_bias", True),
    )


def config_to_hf(c: EvaConfig, model_type: str = MODEL_TYPES[0]) -> dict:
    if c.num_channels != 3:
        raise ConversionError(f"HF EVA towers take 3-channel images, this one takes {c.num_channels}")
    return dict(
        model_type=model_type,
        **dims_to_hf(c),
        image_size=c.image_size,
        patch_size=c.patch_size,
        hidden_act=c.act,
        layer_norm_eps=c.layer_norm_eps,
        qkv_bias=c.qkv_bias,
    )


def rules(c: EvaConfig) -> list[Rule]:
    n = c.num_layers
    layer, ours = "encoder.layers.{i}", "layers_{i}"
    return [
        Rule("embeddings.class_embedding", "class_embedding"),
        Rule("embeddings.position_embedding", "position_embedding"),
        Rule("embeddings.patch_embedding.weight", "patch_embedding/kernel", CONV),
        Rule("embeddings.patch_embedding.bias", "patch_embedding/bias"),
        *dense(f"{layer}.self_attn.qkv", f"{ours}/self_attn/qkv", n, c.qkv_bias),
        *dense(f"{layer}.self_attn.projection", f"{ours}/self_attn/projection", n),
        *dense(f"{layer}.mlp.fc1", f"{ours}/mlp/fc1", n),
        *dense(f"{layer}.mlp.fc2", f"{ours}/mlp/fc2", n),
        *ln(f"{layer}.layer_norm1", f"{ours}/layer_norm1", n),
        *ln(f"{layer}.layer_norm2", f"{ours}/layer_norm2", n),
        *ln("post_layernorm", "post_layernorm"),
    ]
