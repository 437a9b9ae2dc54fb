"""Blip2ForConditionalGeneration <-> ``Blip2`` (EVA + Q-Former adapter + OPT or LLaMA-family decoder).

Keys as transformers 5 save_pretrained writes them: ``vision_model.*``, ``query_tokens``,
``qformer.*``, ``language_projection.*``, ``language_model.*`` (the text model's CausalLM keys).
The Q-Former and top-level helpers here are shared with ``mllm_jax.hf.instructblip``.
"""

from __future__ import annotations

from mllm_jax.errors import ConversionError
from mllm_jax.hf import eva, llama, opt
from mllm_jax.hf.common import Rule, dense, dims_from_hf, dims_to_hf, ln, prefixed
from mllm_jax.models.blip2 import Blip2Config
from mllm_jax.models.opt import OptConfig
from mllm_jax.models.qformer import QFormerConfig

ARCHITECTURE = "Blip2ForConditionalGeneration"
ALIASES = ()


def qformer_config_from_hf(d: dict, encoder_hidden_size: int, text_input: bool) -> QFormerConfig:
    return QFormerConfig(
        **dims_from_hf(d, dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12)),
        act=d.get("hidden_act", "gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        cross_attention_frequency=d.get("cross_attention_frequency", 2),
        encoder_hidden_size=encoder_hidden_size,  # HF overwrites it with the vision width too
        text_input=text_input,
        text_ffn=text_input or d.get("use_qformer_text_input", False),
        vocab_size=d.get("vocab_size", 30522),
        max_positions=d.get("max_position_embeddings", 512),
    )


def qformer_config_to_hf(c: QFormerConfig) -> dict:
    return dict(
        **dims_to_hf(c),
        hidden_act=c.act,
        layer_norm_eps=c.layer_norm_eps,
        cross_attention_frequency=c.cross_attention_frequency,
        encoder_hidden_size=c.encoder_hidden_size,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_positions,
    )


def text_config_from_hf(d: dict):
    """An OptConfig for OPT text models, an LlmConfig for the LLaMA family; T5 is refused."""
    model_type = d.get("model_type", "opt")
    if model_type == "opt":
        return opt.config_from_hf(d)
    if model_type in llama.DECODERS:
        return llama.config_from_hf(d)
    raise ConversionError(
        f"BLIP-2 text model {model_type!r} is not supported; supported: {['opt', *sorted(llama.DECODERS)]}"
    )


def text_config_to_hf(c, base: dict | None) -> dict:
    if isinstance(c, OptConfig):
        return opt.config_to_hf(c)
    text_type = ((base or {}).get("text_config") or {}).get("model_type", "llama")
    return llama.config_to_hf(c, text_type if text_type in llama.DECODERS else "llama")


def config_from_hf(d: dict, text_input: bool = False) -> Blip2Config:
    vision = eva.config_from_hf(d.get("vision_config") or {})
    qformer = qformer_config_from_hf(d.get("qformer_config") or {}, vision.hidden_size, text_input)
    if d.get("image_token_index") is None:
        raise ConversionError("config has no image_token_index; transformers 5 BLIP-2 needs an <image> token")
    config = Blip2Config(
        vision=vision,
        qformer=qformer,
        llm=text_config_from_hf(d.get("text_config") or {}),
        num_query_tokens=d.get("num_query_tokens", 32),
        image_token_id=d["image_token_index"],
    )
    config.validate()
    return config


def common_config_to_hf(c: Blip2Config, base: dict | None, model_type: str, prefix: str) -> dict:
    """``prefix``: "blip_2" or "instructblip", the sub-configs' model_type stem."""
    return dict(
        model_type=model_type,
        vision_config=eva.config_to_hf(c.vision, f"{prefix}_vision_model"),
        qformer_config=dict(qformer_config_to_hf(c.qformer), model_type=f"{prefix}_qformer"),
        text_config=text_config_to_hf(c.llm, base),
        num_query_tokens=c.num_query_tokens,
        image_token_index=c.image_token_id,
    )


def config_to_hf(c: Blip2Config, base: dict | None = None) -> dict:
    if c.instruct:
        raise ConversionError("this model's Q-Former reads instructions: export it as InstructBLIP")
    d = common_config_to_hf(c, base, "blip-2", "blip_2")
    d["qformer_config"]["use_qformer_text_input"] = c.qformer.text_ffn
    d["architectures"] = [ARCHITECTURE]
    return d


def qformer_rules(c: QFormerConfig) -> list[Rule]:
    """Keys relative to the Q-Former root (``qformer.`` in the composite), ours under ``adapter/qformer/``."""
    if c.text_input:
        out = [
            Rule("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding"),
            Rule("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding"),
            *ln("embeddings.layernorm", "embeddings/layernorm"),
        ]
    else:
        out = ln("layernorm", "layernorm")
    n = c.num_layers
    layer, ours = "encoder.layer.{i}", "layer_{i}"
    for i in range(n):  # cross-attention exists only in every k-th layer
        for block in ("attention", "crossattention") if c.has_cross_attention(i) else ("attention",):
            h, o = f"encoder.layer.{i}.{block}", f"layer_{i}/{block}"
            for proj in ("query", "key", "value"):
                out += dense(f"{h}.attention.{proj}", f"{o}/{proj}")
            out += dense(f"{h}.output.dense", f"{o}/output") + ln(f"{h}.output.LayerNorm", f"{o}/layer_norm")
    ffns = [("intermediate_query", "output_query", "ffn_query")]
    if c.text_ffn:
        ffns.append(("intermediate", "output", "ffn_text"))
    for inter, output, ffn in ffns:
        out += dense(f"{layer}.{inter}.dense", f"{ours}/{ffn}/intermediate", n)
        out += dense(f"{layer}.{output}.dense", f"{ours}/{ffn}/output", n)
        out += ln(f"{layer}.{output}.LayerNorm", f"{ours}/{ffn}/layer_norm", n)
    return out


def text_rules(c) -> list[Rule]:
    return opt.rules(c) if isinstance(c, OptConfig) else llama.rules(c)


def rules(c: Blip2Config) -> list[Rule]:
    return (
        prefixed(eva.rules(c.vision), "vision_model.", "vision/")
        + [Rule("query_tokens", "adapter/query_tokens")]
        + prefixed(qformer_rules(c.qformer), "qformer.", "adapter/qformer/")
        + dense("language_projection", "adapter/language_projection")
        + prefixed(text_rules(c.llm), "language_model.", "llm/")
    )
