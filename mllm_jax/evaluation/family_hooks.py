"""Every family-specific call evaluation makes, each in one small function here and nowhere else.

Evaluation asks the family registry (``mllm_jax.families``) and the processor-conventions inputs
(``inference/inputs.py``) only through these functions, so a change of those interfaces changes this
file alone; no other evaluation module compares family names or probes a model config.
"""

from __future__ import annotations

from mllm_jax import families
from mllm_jax.errors import ConfigError, UsageError
from mllm_jax.evaluation.decoder import Decoder
from mllm_jax.families import base, store
from mllm_jax.inference import inputs


def load_model(path: str) -> tuple[families.Pretrained, str]:
    """``(pretrained, assets_dir)`` of a HF directory, our checkpoint or a training workdir."""
    return store.load_any(path)


def prepare_example(pretrained, assets: str, prompt: str, image) -> families.Inputs:
    """One example's tokens, pixels and embed kwargs as the model's own HF processor makes them."""
    return inputs.prepare_inputs(pretrained.family, pretrained.config, assets, prompt, [image])


def max_text_columns(pretrained) -> int | None:
    """How many positions the instruction text the adapter reads has (InstructBLIP's Q-Former);
    None: the model reads none."""
    return families.get(pretrained.family).text_positions(pretrained.config) or None


def _decoder(pretrained, config, tokenizer, **fields) -> Decoder:
    model = families.build(pretrained.family, config)
    return Decoder(model, pretrained.params, tokenizer, **fields).placed()


def processor_decoder(pretrained, assets: str, first: families.Inputs, **fields) -> Decoder:
    """The decoder for examples prepared by ``prepare_example``; ``first`` completes the config as
    ``predict`` does (IDEFICS) and brings the tokenizer. EOS ids as HF ``generate`` takes them."""
    eos = inputs.eos_token_ids(assets, pretrained.hf_config, first.tokenizer)
    config = first.config or pretrained.config
    return _decoder(pretrained, config, first.tokenizer, eos_ids=tuple(eos), **fields)


def synthetic_decoder(pretrained, assets: str, task: str, **fields) -> Decoder:
    """The decoder for prompts our data pipeline encodes (the built-in synthetic tasks): the saved
    tokenizer, the processor's image spec and the family's prompt layout."""
    if pretrained.family not in families.TRAINABLE:
        raise UsageError(f"{task} needs an image-text model, not {pretrained.family!r}")
    tokenizer = base.load_tokenizer(assets)
    try:
        image_spec = base.image_spec_of_assets(assets)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    model_spec = families.TRAINABLE[pretrained.family].model_spec(pretrained.config, tokenizer)
    fields |= dict(image_spec=image_spec, model_spec=model_spec)
    return _decoder(pretrained, pretrained.config, tokenizer, **fields)
