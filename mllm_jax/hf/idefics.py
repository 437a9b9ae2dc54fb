"""IdeficsForVisionText2Text <-> ``Idefics`` (CLIP tower + Perceiver + gated x-attn + LLaMA decoder).

Keys are as transformers 5 ``save_pretrained`` writes them (``model.*`` and ``lm_head.*``), which is also
the layout of the published IDEFICS checkpoints. IDEFICS hard-wires a few widths that our modules keep
configurable: the perceiver works at the vision width with a 4x ReLU MLP, the cross-attention reads
vision-width keys and shares the decoder's width, heads, MLP size and activation. ``config_to_hf``
refuses models that differ there, since transformers could not load them.
"""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf import clip, llama
from mllm_jax.hf.common import LINEAR, SAME, Rule, ln, prefixed
from mllm_jax.models.idefics import IdeficsConfig
from mllm_jax.models.perceiver import PerceiverConfig
from mllm_jax.models.xattn import XattnConfig

ALIASES = ()
# What tied checkpoints may store anyway (a loader drops them when ``llm.tie_embeddings``).
TIED_KEYS = ("lm_head.weight", "lm_head.additional_fc.weight")

# The decoder's fields at the top level of an IdeficsConfig (LLaMA's names), and its RoPE settings.
_TEXT_KEYS = tuple(
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads hidden_act rms_norm_eps "
    "max_position_embeddings tie_word_embeddings".split()
)
_ROPE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling")


def _hf_defaults() -> dict:
    """transformers' own IdeficsConfig defaults (sub-configs included), for configs that omit keys."""
    from transformers import IdeficsConfig

    return IdeficsConfig().to_dict()


def config_from_hf(d: dict) -> IdeficsConfig:
    defaults = _hf_defaults()
    v = {**defaults["vision_config"], **(d.get("vision_config") or {})}
    vision = clip.config_from_hf({**v, "model_type": "clip_vision_model", "hidden_size": v["embed_dim"]})
    text = {k: defaults[k] for k in _TEXT_KEYS} | {k: d[k] for k in (*_TEXT_KEYS, *_ROPE_KEYS) if k in d}
    llm = llama.config_from_hf({"model_type": "llama", **text})
    p = {**defaults["perceiver_config"], **(d.get("perceiver_config") or {})}
    perceiver = PerceiverConfig(
        embed_dim=vision.hidden_size,
        num_latents=p["resampler_n_latents"],
        depth=p["resampler_depth"],
        num_heads=p["resampler_n_heads"],
        head_dim=p["resampler_head_dim"],
        mlp_dim=4 * vision.hidden_size,
        act="relu",
        qk_layer_norms=p["qk_layer_norms_perceiver"],
    )
    xattn = XattnConfig(
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_heads=llm.num_heads,
        head_dim=llm.head_dim,
        kv_dim=vision.hidden_size,
        act=llm.act,
        rms_norm_eps=llm.rms_norm_eps,
        qk_layer_norms=d.get("qk_layer_norms", False),
        alpha_type=d.get("alpha_type", "float"),
        alpha_init=d.get("alpha_initializer", "zeros"),
        alpha_init_std=float(d.get("alphas_initializer_range", 0.0)),
    )
    config = IdeficsConfig(
        vision=vision,
        perceiver=perceiver,
        xattn=xattn,
        llm=llm,
        use_resampler=d.get("use_resampler", False),
        cross_layer_interval=d.get("cross_layer_interval", 1),
        additional_vocab_size=d.get("additional_vocab_size", 0),
    )
    try:
        config.validate()
    except ValueError as e:
        raise ConversionError(f"IDEFICS config not supported: {e}") from None
    return config


def _check_exportable(c: IdeficsConfig):
    if clip.model_type_of(c.vision) != "clip_vision_model" or c.vision.pooling_head:
        raise ConversionError("IDEFICS's vision tower is CLIP: class token, pre-LN, no patch bias, no head")
    lc = c.llm
    if lc.num_kv_heads != lc.num_heads or lc.head_dim * lc.num_heads != lc.hidden_size:
        raise ConversionError(
            "IDEFICS's decoder has no grouped-query attention and head_dim = hidden / heads"
        )
    if lc.qkv_bias or lc.o_bias or lc.mlp_bias or lc.sliding_window:
        raise ConversionError("IDEFICS's decoder has no biases and no sliding window")
    x, p = c.xattn, c.perceiver
    want_x = (lc.hidden_size, lc.intermediate_size, lc.num_heads, lc.head_dim, c.vision.hidden_size, lc.act)
    if (x.hidden_size, x.intermediate_size, x.num_heads, x.head_dim, x.kv_dim, x.act) != want_x or (
        x.rms_norm_eps != lc.rms_norm_eps
    ):
        raise ConversionError(
            "IDEFICS's cross-attention shares the decoder's sizes and reads vision-width keys"
        )
    want_p = (c.vision.hidden_size, 4 * c.vision.hidden_size, "relu", 1e-5, 0)
    if (p.embed_dim, p.mlp_dim, p.act, p.layer_norm_eps, p.max_frames) != want_p:
        raise ConversionError(
            "IDEFICS's perceiver works at the vision width with a 4x ReLU MLP, LayerNorm eps 1e-5 and no "
            "frame embeddings"
        )


def config_to_hf(c: IdeficsConfig, base: dict | None = None) -> dict:
    del base  # every field IDEFICS reads is written; merge_config keeps the rest of the original
    _check_exportable(c)
    text = llama.config_to_hf(c.llm, "llama")
    vision = clip.config_to_hf(c.vision)
    vision = dict(
        model_type="idefics_vision",
        embed_dim=vision.pop("hidden_size"),
        **{k: v for k, v in vision.items() if k != "model_type"},
    )
    p = c.perceiver
    return dict(
        model_type="idefics",
        architectures=["IdeficsForVisionText2Text"],
        **{k: text[k] for k in (*_TEXT_KEYS, "rope_parameters")},
        additional_vocab_size=c.additional_vocab_size,
        alpha_type=c.xattn.alpha_type,
        # HF knows no "constant" init; the exported gates carry their trained values anyway
        alpha_initializer="zeros" if c.xattn.alpha_init == "constant" else c.xattn.alpha_init,
        alphas_initializer_range=c.xattn.alpha_init_std,
        cross_layer_interval=c.cross_layer_interval,
        qk_layer_norms=c.xattn.qk_layer_norms,
        use_resampler=c.use_resampler,
        vision_config=vision,
        perceiver_config=dict(
            model_type="idefics_perciever",  # sic: transformers' spelling
            use_resampler=c.use_resampler,
            resampler_n_latents=p.num_latents,
            resampler_depth=p.depth,
            resampler_n_heads=p.num_heads,
            resampler_head_dim=p.head_dim,
            qk_layer_norms_perceiver=p.qk_layer_norms,
        ),
    )


def perceiver_rules(c: PerceiverConfig) -> list[Rule]:
    """Relative to ``IdeficsPerceiverResampler`` (``blocks.i.0`` attention, ``blocks.i.1`` MLP)."""
    n = c.depth
    out = [Rule("latents", "latents")] + ln("layer_norm", "layer_norm")
    attn, mlp = "blocks.{i}.0", "blocks.{i}.1"
    for name in ("context_layer_norm", "latents_layer_norm") + (
        ("q_layer_norm", "k_layer_norm") if c.qk_layer_norms else ()
    ):
        out += ln(f"{attn}.{name}", f"blocks_{{i}}/attn/{name}", n)
    for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
        out.append(Rule(f"{attn}.{proj}.weight", f"blocks_{{i}}/attn/{proj}/kernel", LINEAR, n))
    out += ln(f"{mlp}.ln", "blocks_{i}/mlp/ln", n)
    for proj in ("fc", "c_proj"):
        out.append(Rule(f"{mlp}.{proj}.weight", f"blocks_{{i}}/mlp/{proj}/kernel", LINEAR, n))
    return out


def xattn_rules(c: XattnConfig, n: int) -> list[Rule]:
    """Relative to ``gated_cross_attn_layers``; ours are ``xattn_{i}``."""
    out = [
        Rule("{i}.alpha_cross_attn", "xattn_{i}/alpha_cross_attn", SAME, n),
        Rule("{i}.alpha_dense", "xattn_{i}/alpha_dense", SAME, n),
    ]
    out += ln("{i}.input_layernorm", "xattn_{i}/input_layernorm", n, bias=False)
    out += ln("{i}.post_attention_layernorm", "xattn_{i}/post_attention_layernorm", n, bias=False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append(
            Rule(f"{{i}}.cross_attn.{proj}.weight", f"xattn_{{i}}/cross_attn/{proj}/kernel", LINEAR, n)
        )
    if c.qk_layer_norms:
        for name in ("q_layer_norm", "k_layer_norm"):
            out += ln(f"{{i}}.cross_attn.{name}", f"xattn_{{i}}/cross_attn/{name}", n, bias=False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(Rule(f"{{i}}.mlp.{proj}.weight", f"xattn_{{i}}/mlp/{proj}/kernel", LINEAR, n))
    return out


def rules(c: IdeficsConfig) -> list[Rule]:
    out = prefixed(clip.rules(c.vision), "model.vision_model.", "vision/")
    if c.use_resampler:
        out += prefixed(perceiver_rules(c.perceiver), "model.perceiver_resampler.", "adapter/perceiver/")
    out += prefixed(xattn_rules(c.xattn, c.num_xattn_layers), "model.gated_cross_attn_layers.", "adapter/")
    # The decoder is LLaMA's layout under the same names (model.embed_tokens, model.layers, lm_head).
    out += prefixed(llama.rules(c.llm), "", "llm/")
    if c.additional_vocab_size:
        out.append(
            Rule("model.embed_tokens.additional_embedding.weight", "llm/additional_embedding/embedding")
        )
        if not c.llm.tie_embeddings:
            out.append(Rule("lm_head.additional_fc.weight", "llm/additional_fc/kernel", LINEAR))
    return out
