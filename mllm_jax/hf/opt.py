"""OPTForCausalLM <-> ``Opt``; keys relative to the CausalLM root (``model.decoder.*``, ``lm_head.*``)."""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf.common import LINEAR, Rule, dense, ln
from mllm_jax.models.opt import OptConfig

ARCHITECTURE = "OPTForCausalLM"
# facebook/opt-* checkpoints were saved from OPTModel, without the CausalLM's ``model.`` level.
ALIASES = (("decoder.", "model.decoder."),)


def config_from_hf(d: dict) -> OptConfig:
    if d.get("model_type", "opt") != "opt":
        raise ConversionError(f"text model_type {d.get('model_type')!r} is not OPT")
    if not d.get("layer_norm_elementwise_affine", True):
        raise ConversionError(
            "OPT with layer_norm_elementwise_affine=False (LayerNorm without weights) is not supported"
        )
    hidden = d.get("hidden_size", 768)
    proj = d.get("word_embed_proj_dim") or hidden
    return OptConfig(
        vocab_size=d.get("vocab_size", 50272),
        hidden_size=hidden,
        intermediate_size=d.get("ffn_dim", 3072),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        # None when equal to hidden_size: one spelling per model, so configs compare equal
        word_embed_proj_dim=None if proj == hidden else proj,
        max_positions=d.get("max_position_embeddings", 2048),
        act=d.get("activation_function", "relu"),
        pre_norm=d.get("do_layer_norm_before", True),
        remove_final_layer_norm=d.get("_remove_final_layer_norm", False),
        bias=d.get("enable_bias", True),
        tie_embeddings=d.get("tie_word_embeddings", True),
    )


def config_to_hf(c: OptConfig, base: dict | None = None) -> dict:
    del base  # nothing of the old config changes what we write; merge_config keeps its other fields
    return dict(
        model_type="opt",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        ffn_dim=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        word_embed_proj_dim=c.embed_dim,
        max_position_embeddings=c.max_positions,
        activation_function=c.act,
        do_layer_norm_before=c.pre_norm,
        _remove_final_layer_norm=c.remove_final_layer_norm,
        enable_bias=c.bias,
        layer_norm_elementwise_affine=True,
        tie_word_embeddings=c.tie_embeddings,
    )


def rules(c: OptConfig) -> list[Rule]:
    n, root = c.num_layers, "model.decoder"
    layer, ours = f"{root}.layers.{{i}}", "layers_{i}"
    out = [
        Rule(f"{root}.embed_tokens.weight", "embed_tokens/embedding"),
        Rule(f"{root}.embed_positions.weight", "embed_positions/embedding"),
    ]
    if c.projects:
        out += dense(f"{root}.project_in", "project_in", bias=False)
        out += dense(f"{root}.project_out", "project_out", bias=False)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += dense(f"{layer}.self_attn.{proj}", f"{ours}/self_attn/{proj}", n, c.bias)
    out += dense(f"{layer}.fc1", f"{ours}/fc1", n, c.bias) + dense(f"{layer}.fc2", f"{ours}/fc2", n, c.bias)
    out += ln(f"{layer}.self_attn_layer_norm", f"{ours}/self_attn_layer_norm", n)
    out += ln(f"{layer}.final_layer_norm", f"{ours}/final_layer_norm", n)
    if c.final_norm:
        out += ln(f"{root}.final_layer_norm", "final_layer_norm")
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", "lm_head/kernel", LINEAR))
    return out
