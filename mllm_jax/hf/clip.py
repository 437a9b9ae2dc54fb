"""CLIPVisionModel and SiglipVisionModel <-> ``VisionTower``.

Keys are relative to the vision model root as transformers 5 saves it (``embeddings.*``,
``encoder.layers.{i}.*``); the legacy ``vision_model.`` prefix of older checkpoints is accepted.
"""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf.common import CONV, SPLIT3, SPLIT3_LINEAR, Rule, dense, dims_from_hf, dims_to_hf, ln
from mllm_jax.models.vit import VitConfig

# model_type -> the switches that tell the two towers apart.
TOWERS = {
    "clip_vision_model": dict(
        class_token=True,
        pre_norm=True,
        patch_bias=False,
        architecture="CLIPVisionModel",
        default_act="quick_gelu",
        default_eps=1e-5,
        default_patch=32,
    ),
    "siglip_vision_model": dict(
        class_token=False,
        pre_norm=False,
        patch_bias=True,
        architecture="SiglipVisionModel",
        default_act="gelu_pytorch_tanh",
        default_eps=1e-6,
        default_patch=16,
    ),
}
ALIASES = (("vision_model.", ""),)
# transformers' defaults (ViT-B at 224 px), which older stock configs leave out of config.json
DEFAULT_DIMS = dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12)


def config_from_hf(d: dict) -> VitConfig:
    model_type = d.get("model_type")
    if model_type not in TOWERS:
        raise ConversionError(f"vision model_type {model_type!r} not supported; supported: {sorted(TOWERS)}")
    t = TOWERS[model_type]
    return VitConfig(
        **dims_from_hf(d, DEFAULT_DIMS),
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", t["default_patch"]),
        num_channels=d.get("num_channels", 3),
        act=d.get("hidden_act", t["default_act"]),
        layer_norm_eps=d.get("layer_norm_eps", t["default_eps"]),
        class_token=t["class_token"],
        pre_norm=t["pre_norm"],
        patch_bias=t["patch_bias"],
        pooling_head=model_type == "siglip_vision_model" and d.get("vision_use_head", True),
    )


def model_type_of(c: VitConfig) -> str:
    for name, t in TOWERS.items():
        if (c.class_token, c.pre_norm, c.patch_bias) == (t["class_token"], t["pre_norm"], t["patch_bias"]):
            return name
    raise ConversionError(
        "this vision tower (class_token/pre_norm/patch_bias combination) has no HF equivalent"
    )


def config_to_hf(c: VitConfig) -> dict:
    model_type = model_type_of(c)
    d = dict(
        model_type=model_type,
        **dims_to_hf(c),
        image_size=c.image_size,
        patch_size=c.patch_size,
        num_channels=c.num_channels,
        hidden_act=c.act,
        layer_norm_eps=c.layer_norm_eps,
    )
    if model_type == "siglip_vision_model":
        d["vision_use_head"] = c.pooling_head
    elif c.pooling_head:
        raise ConversionError("CLIP vision towers have no pooling head")
    return d


def rules(c: VitConfig) -> list[Rule]:
    n = c.num_layers
    out = [
        Rule("embeddings.patch_embedding.weight", "patch_embedding/kernel", CONV),
        Rule("embeddings.position_embedding.weight", "position_embedding"),
    ]
    if c.patch_bias:
        out.append(Rule("embeddings.patch_embedding.bias", "patch_embedding/bias"))
    if c.class_token:
        out.append(Rule("embeddings.class_embedding", "class_embedding"))
    if c.pre_norm:
        out += ln("pre_layrnorm", "pre_layrnorm")
    layer = "encoder.layers.{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += dense(f"{layer}.self_attn.{proj}", f"layers_{{i}}/self_attn/{proj}", n)
    out += dense(f"{layer}.mlp.fc1", "layers_{i}/mlp/fc1", n) + dense(
        f"{layer}.mlp.fc2", "layers_{i}/mlp/fc2", n
    )
    out += ln(f"{layer}.layer_norm1", "layers_{i}/layer_norm1", n)
    out += ln(f"{layer}.layer_norm2", "layers_{i}/layer_norm2", n)
    out += ln("post_layernorm", "post_layernorm")
    if c.pooling_head:
        qkv = ("head/q_proj/{}", "head/k_proj/{}", "head/v_proj/{}")
        out += [
            Rule("head.probe", "head/probe"),
            Rule("head.attention.in_proj_weight", tuple(p.format("kernel") for p in qkv), SPLIT3_LINEAR),
            Rule("head.attention.in_proj_bias", tuple(p.format("bias") for p in qkv), SPLIT3),
        ]
        out += dense("head.attention.out_proj", "head/out_proj") + ln("head.layernorm", "head/layernorm")
        out += dense("head.mlp.fc1", "head/mlp/fc1") + dense("head.mlp.fc2", "head/mlp/fc2")
    return out
