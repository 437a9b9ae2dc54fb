"""LlamaForCausalLM (and Mistral / Qwen2, which share its layout) <-> ``Llm``."""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf.common import LINEAR, SAME, Rule, dims_from_hf, dims_to_hf
from mllm_jax.models.llm import ROPE_TYPES, LlmConfig

# model_type -> (architecture, how its attention biases follow from the config).
DECODERS = {
    "llama": ("LlamaForCausalLM", lambda d: (d.get("attention_bias", False), d.get("attention_bias", False))),
    "mistral": ("MistralForCausalLM", lambda d: (False, False)),
    "qwen2": ("Qwen2ForCausalLM", lambda d: (True, False)),
}
ALIASES = ()


def _rope(d: dict) -> dict:
    """transformers 5 ``rope_parameters`` or the legacy ``rope_theta`` + ``rope_scaling`` pair."""
    p = dict(d.get("rope_parameters") or {})
    if not p:
        p = dict(d.get("rope_scaling") or {})
        p.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    p.setdefault("rope_type", p.pop("type", "default"))
    return p


def config_from_hf(d: dict) -> LlmConfig:
    model_type = d.get("model_type")
    if model_type not in DECODERS:
        raise ConversionError(f"text model_type {model_type!r} not supported; supported: {sorted(DECODERS)}")
    rope = _rope(d)
    if rope["rope_type"] not in ROPE_TYPES:
        raise ConversionError(f"rope_type {rope['rope_type']!r} not supported; supported: {ROPE_TYPES}")
    if model_type == "qwen2" and d.get("use_sliding_window"):
        raise ConversionError("Qwen2 per-layer sliding window attention is not supported")
    qkv_bias, o_bias = DECODERS[model_type][1](d)
    dims = dims_from_hf(d)
    return LlmConfig(
        vocab_size=d["vocab_size"],
        **dims,
        num_kv_heads=d.get("num_key_value_heads") or dims["num_heads"],
        head_dim=d.get("head_dim") or dims["hidden_size"] // dims["num_heads"],
        act=d.get("hidden_act", "silu"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        max_positions=d.get("max_position_embeddings", 2048),
        rope_theta=float(rope["rope_theta"]),
        rope_type=rope["rope_type"],
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=d.get("mlp_bias", False),
        tie_embeddings=d.get("tie_word_embeddings", False),
        sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
    )


def config_to_hf(c: LlmConfig, model_type: str = "llama") -> dict:
    if model_type not in DECODERS:
        raise ConversionError(f"cannot export a {model_type!r} decoder; supported: {sorted(DECODERS)}")
    if DECODERS[model_type][1]({"attention_bias": c.qkv_bias}) != (c.qkv_bias, c.o_bias):
        raise ConversionError(f"a {model_type} decoder cannot have qkv_bias={c.qkv_bias}, o_bias={c.o_bias}")
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type in ("linear", "llama3"):
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope.update(
            low_freq_factor=c.rope_low_freq_factor,
            high_freq_factor=c.rope_high_freq_factor,
            original_max_position_embeddings=c.rope_original_max_positions,
        )
    d = dict(
        model_type=model_type,
        vocab_size=c.vocab_size,
        **dims_to_hf(c),
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        hidden_act=c.act,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_positions,
        rope_parameters=rope,
        tie_word_embeddings=c.tie_embeddings,
    )
    if model_type == "llama":
        d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    if model_type == "mistral":
        d["sliding_window"] = c.sliding_window
    return d


def rules(c: LlmConfig) -> list[Rule]:
    """Keys relative to the CausalLM root (``model.*`` and ``lm_head.weight``)."""
    n = c.num_layers
    layer = "model.layers.{i}"
    out = [
        Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
        Rule("model.norm.weight", "norm/scale"),
    ]
    for proj, bias in (
        ("q_proj", c.qkv_bias),
        ("k_proj", c.qkv_bias),
        ("v_proj", c.qkv_bias),
        ("o_proj", c.o_bias),
    ):
        out.append(
            Rule(f"{layer}.self_attn.{proj}.weight", f"layers_{{i}}/self_attn/{proj}/kernel", LINEAR, n)
        )
        if bias:
            out.append(Rule(f"{layer}.self_attn.{proj}.bias", f"layers_{{i}}/self_attn/{proj}/bias", SAME, n))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(Rule(f"{layer}.mlp.{proj}.weight", f"layers_{{i}}/mlp/{proj}/kernel", LINEAR, n))
        if c.mlp_bias:
            out.append(Rule(f"{layer}.mlp.{proj}.bias", f"layers_{{i}}/mlp/{proj}/bias", SAME, n))
    out.append(Rule(f"{layer}.input_layernorm.weight", "layers_{i}/input_layernorm/scale", SAME, n))
    out.append(
        Rule(f"{layer}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/scale", SAME, n)
    )
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", "lm_head/kernel", LINEAR))
    return out
