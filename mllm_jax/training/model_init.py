"""Where a run's model comes from, first that applies:

1. the workdir already holds a run: its model config and tokenizer (resume; ``RunSetup``);
2. ``model.init.checkpoint``: one of our checkpoints;
3. ``model.init.hf``: a whole HF directory of the family (``LlavaForConditionalGeneration``,
   ``IdeficsForVisionText2Text``, ``Blip2ForConditionalGeneration``);
4. ``model.init.vision`` + ``model.init.llm``: HF CLIP/SigLIP + LLaMA-family dirs, adapter from scratch
   (how LLaVA stage 1 and Flamingo start);
5. nothing: from scratch with the sizes in ``model.*`` and the built-in tokenizer.

``initial_model`` returns the model config, the tokenizer, the weights to start from (numpy, or None)
and the HF configs of pretrained parts (the base of a later export).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import logging

from mllm_jax import paths
from mllm_jax.data import boxes, synthetic
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.errors import ConfigError, ConversionError
from mllm_jax.families import TrainableFamily, base, store
from mllm_jax.families.trainable import InitSettings, ModelSettings
from mllm_jax.hf.common import PROCESSOR_FILES, TOKENIZER_FILES, has_any_file


@dataclasses.dataclass
class InitialModel:
    config: object
    tokenizer: object
    params: dict | None = None  # the weights to start from (numpy; for init.vision/llm only those parts)
    hf_bases: dict = dataclasses.field(default_factory=dict)  # HF configs of pretrained vision / llm parts


def initial_model(family: TrainableFamily, m: ModelSettings, synthetic_config) -> InitialModel:
    from transformers import AutoTokenizer

    init, tok_dir = m.init, m.tokenizer
    own_tokenizer = tok_dir not in ("", "builtin")
    if init.checkpoint:
        pretrained = store.load_model(init.checkpoint)
        if pretrained.family != family.name:
            raise ConfigError(
                f"config.model.init.checkpoint holds a {pretrained.family!r} model, not {family.name}"
            )
        tokenizer = AutoTokenizer.from_pretrained(
            tok_dir if own_tokenizer else store.local_assets(init.checkpoint), trust_remote_code=False
        )
        tokenizer = location_tokens(m, tokenizer, "config.model.init.checkpoint")
        return InitialModel(pretrained.config, tokenizer, pretrained.params)
    if init.hf:
        pretrained = load_hf(init.hf, family.name, "config.model.init.hf")
        tok_dir = tok_dir if own_tokenizer else init.hf
        check_tokenizer(tok_dir, "config.model.tokenizer" if own_tokenizer else "config.model.init.hf")
        tokenizer = with_chat_template(
            AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False), tok_dir
        )
        return InitialModel(
            pretrained.config, location_tokens(m, tokenizer, "config.model.init.hf"), pretrained.params
        )
    if init.vision or init.llm:
        return _from_parts(family, m, tok_dir if own_tokenizer else init.llm)
    if own_tokenizer:
        check_tokenizer(tok_dir, "config.model.tokenizer")
        tokenizer = with_chat_template(
            AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False), tok_dir
        )
    else:
        tokenizer = build_tokenizer(synthetic.vocabulary(synthetic_config), family.special_tokens)
    tokenizer = location_tokens(m, tokenizer)
    try:
        return InitialModel(family.scratch(m, tokenizer), tokenizer)
    except (TypeError, KeyError, ValueError) as e:  # a size group with an unknown or bad field
        raise ConfigError(f"config.model: {e}") from None


def _from_parts(family: TrainableFamily, m: ModelSettings, tok_dir: str) -> InitialModel:
    from transformers import AutoTokenizer

    init = m.init
    if not (init.vision and init.llm):
        raise ConfigError("config.model.init.vision and config.model.init.llm must be given together")
    if not family.starts_from_parts:
        raise ConfigError(
            f"config.model.init.vision/llm: {family.name} starts from a whole model (config.model.init.hf)"
            " or from scratch"
        )
    check_processor(init.vision, "config.model.init.vision")
    tok_key = "config.model.tokenizer" if tok_dir != init.llm else "config.model.init.llm"
    vision = load_hf(init.vision, family.vision_family, "config.model.init.vision")
    llm = load_hf(init.llm, "llm", "config.model.init.llm")  # a wrong kind of model is the first error
    check_tokenizer(tok_dir, tok_key)
    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False), tok_dir)
    missing = [t for t in family.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer = location_tokens(m, tokenizer)  # grown into the tables below, like <image>
    llm_config, llm_params = llm.config, llm.params
    if family.grows_vocab and len(tokenizer) > llm_config.vocab_size:
        # e.g. Vicuna's 32000 + <image>: grow the tables, as LLaVA's HF conversion, to a multiple of 64
        # (IDEFICS keeps new tokens in its separate additional table instead)
        vocab = -(-len(tokenizer) // 64) * 64
        llm_params = grow_vocab(llm_params, vocab)
        llm_config = dataclasses.replace(llm_config, vocab_size=vocab)
    config = family.from_parts(m, vision.config, llm_config, tokenizer)
    pretrained = {"vision": vision.params, "llm": llm_params}
    return InitialModel(config, tokenizer, pretrained, {"vision": vision.hf_config, "llm": llm.hf_config})


# Where stock HF repos keep a chat template outside tokenizer_config.json (the tokenizer and image
# processor files: hf.common.TOKENIZER_FILES, PROCESSOR_FILES).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def check_tokenizer(directory: str, key: str):
    """A one-line error naming the files a tokenizer directory lacks (before transformers' own)."""
    if os.path.isdir(directory) and not has_any_file(directory, TOKENIZER_FILES):
        raise ConfigError(
            f"{key}={directory!r}: no tokenizer files ({' / '.join(TOKENIZER_FILES)}); point"
            " config.model.tokenizer at a directory that has them (stock LLM repos keep them by config.json)"
        )


def check_processor(directory: str, key: str):
    """The tower's image preprocessing (size, crop, mean / std) comes from its preprocessor_config.json."""
    if os.path.isdir(directory) and not has_any_file(directory, PROCESSOR_FILES):
        raise ConfigError(
            f"{key}={directory!r}: no preprocessor_config.json (the image processor's settings, which stock"
            " CLIP / SigLIP repos carry beside config.json; copy it from the tower's repo)"
        )


def with_chat_template(tokenizer, directory: str):
    """A tokenizer whose chat template sits in its own file (``chat_template.jinja``, or a processor's
    ``chat_template.json``, as stock LLaVA-style repos keep it) rather than in tokenizer_config.json."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    for name in CHAT_TEMPLATE_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    return tokenizer


def grow_vocab(llm_params: dict, vocab: int) -> dict:
    """New token rows (and lm_head columns) start at the mean of the existing ones, as LLaVA does."""
    params = dict(llm_params)
    table = np.asarray(params["embed_tokens"]["embedding"])
    extra = vocab - table.shape[0]
    rows = np.repeat(table.mean(0, keepdims=True), extra, axis=0).astype(table.dtype)
    params["embed_tokens"] = {"embedding": np.concatenate([table, rows])}
    if "lm_head" in params:
        head = np.asarray(params["lm_head"]["kernel"])
        cols = np.repeat(head.mean(1, keepdims=True), extra, axis=1).astype(head.dtype)
        params["lm_head"] = {"kernel": np.concatenate([head, cols], axis=1)}
    return params


def location_tokens(m: ModelSettings, tokenizer, whole_model: str = ""):
    """``config.model.location_tokens``: PaliGemma's ``<loc0000>``..``<loc1023>`` join the tokenizer
    before the model is sized (so the embeddings and LM head cover them, and the saved tokenizer carries
    them). A whole pretrained model (``whole_model``: its config key) is not resized: it must have them."""
    if not m.location_tokens:
        return tokenizer
    if not whole_model:
        boxes.add_location_tokens(tokenizer)
    elif not set(boxes.LOCATION_TOKENS) <= set(tokenizer.get_vocab()):
        raise ConfigError(
            f"config.model.location_tokens: the tokenizer of {whole_model} lacks <loc0000>..<loc1023> and a"
            " whole pretrained model is not resized; start from init.vision + init.llm or from scratch"
        )
    return tokenizer


def assets_source(init: InitSettings) -> str:
    """The HF-assets directory of a whole-model init (HF dir or our checkpoint), or ""."""
    if init.hf:
        return init.hf
    return store.local_assets(init.checkpoint) if init.checkpoint else ""


def local_model(m: ModelSettings) -> ModelSettings:
    """``m`` with its HF directories in buckets (``init.hf/vision/llm``, tokenizers) replaced by local
    copies, which transformers can read (our checkpoints stay where they are: orbax reads buckets)."""
    init = m.init
    init = dataclasses.replace(
        init, **{k: paths.local_dir(getattr(init, k)) for k in ("hf", "vision", "llm")}
    )
    tokenizers = {k: paths.local_dir(v) for k, v in m.tokenizers().items() if paths.is_remote(v)}
    return dataclasses.replace(m, init=init, **tokenizers)


def load_hf(path: str, family: str, key: str) -> base.Pretrained:
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: no such directory")
    try:
        pretrained = store.load_pretrained(path)
    except ConversionError as e:
        raise ConfigError(f"{key}: {e}") from None
    if pretrained.family != family:
        raise ConfigError(f"{key}={path!r} holds a {pretrained.family!r} model; expected {family!r}")
    logging.info("loaded %s weights from %s", family, path)
    return pretrained


def image_spec(family: TrainableFamily, m: ModelSettings, config) -> ImageSpec:
    """How a new run prepares images: as the processor of the model it starts from, else by the
    family's image mode with the pretrained tower's statistics, else ``model.image_mean/std``."""
    source = assets_source(m.init)
    if source:
        return base.image_spec_of_assets(source)
    if m.init.vision:
        spec = ImageSpec.from_processor_config(base.processor_config(m.init.vision))
        # the family's processor (saved with the run) decides crop or resize; the tower its stats
        return dataclasses.replace(spec, mode=family.image_mode, shortest_edge=None)
    size = config.vision.image_size
    return ImageSpec(size=size, mean=m.image_mean, std=m.image_std, mode=family.image_mode)
