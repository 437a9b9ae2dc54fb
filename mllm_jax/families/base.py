"""What a model family is: the one interface the rest of the library talks to.

A ``Family`` knows its config and module classes, how its config and params map to and from HF
transformers (its ``hf`` conversion modules), how the family's HF processor prepares a prompt with images
(``prepare_inputs``), and, for the families that train, how a model is sized from ``config.model``,
where images sit in the token sequence (``model_spec``), which processor is saved with a run, its FLOPs
and the stage losses it supports. One subclass per file in this package; ``FAMILIES`` in
``__init__`` is the registry. Nothing outside this package compares family names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from types import ModuleType

import jax.numpy as jnp
import numpy as np

from mllm_jax.data.transforms import ImageSpec
from mllm_jax.errors import ConfigError, UsageError
from mllm_jax.hf import common
from mllm_jax.models.layers import AttentionKernel

IMAGE_TOKEN = "<image>"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Pretrained:
    """A loaded model: its family name, our config, params (numpy) and the HF config it came from."""

    family: str
    config: object
    params: dict
    hf_config: dict  # the original config.json, kept as the base of a later export


@dataclasses.dataclass
class Inputs:
    """One prompt prepared as the family's HF processor prepares it."""

    tokenizer: object
    tokens: list[int]
    pixels: np.ndarray | None = None  # [1, I, H, W, C]
    embed_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. InstructBLIP's Q-Former text
    config: object = None  # the model config completed with what the tokenizer knows (None: as loaded)


class Family:
    """Defaults shared by every family; a family file overrides what differs."""

    name: str = ""
    config_cls: type
    module_cls: type
    # HF model_type (or architecture name, where one model_type has several classes) -> conversion module
    hf_types: dict[str, ModuleType] = {}
    tied_keys: tuple[str, ...] = ()  # HF keys of an lm_head tied to the embeddings (a stored copy is dropped)
    trains: bool = False  # a whole image-text model that `main` trains (the rest are its parts)
    reads_media: bool = False  # images reach the decoder through cross-attention (Flamingo), not as tokens
    # what predict --explain draws (inference/explain.py): "tokens" (image tokens in the sequence, one
    # per patch), "cross_attention" (gated cross-attention onto the media), "qformer" (via the queries)
    attention_map: str = "tokens"

    # -- modules and configs

    def build(self, config, dtype=jnp.float32, remat: str = "none", scan_layers: bool = False,
              attention: AttentionKernel = AttentionKernel()):  # fmt: skip
        """The linen module for ``config``, computing in ``dtype``."""
        return self.module_cls(config, dtype=dtype, remat=remat, scan_layers=scan_layers, attention=attention)

    def scans_layers(self, module) -> bool:
        """Whether ``module`` stacks its layers (``nn.scan``): the KV cache is stacked likewise."""
        return module.scan_layers

    def frames_per_media(self, config) -> int:
        """Images (video frames) per media item the model reads; 1 for image models."""
        return 1

    def example_inputs(self, config) -> tuple:
        """Arguments of ``module.init``: a short token row and, with a vision tower, one media item."""
        tokens = np.zeros((1, 8), np.int32)
        v = self.vision_config(config)
        if v is None:
            return (tokens,)
        n = self.frames_per_media(config)
        return tokens, np.zeros((1, n, v.image_size, v.image_size, v.num_channels), np.float32)

    def vision_config(self, config):
        return getattr(config, "vision", None)

    def decoder_config(self, config):
        """The config of the decoder generation runs (its positions, heads, KV cache)."""
        return config.llm

    def text_positions(self, config) -> int:
        """Positions of the instruction text the adapter reads (InstructBLIP's Q-Former); 0: none."""
        return 0

    def config_to_dict(self, config) -> dict:
        return dataclasses.asdict(config)

    def config_from_dict(self, d: dict):
        return config_from_dict(self.config_cls, d)

    # -- HF interop

    def config_from_hf(self, hf_config: dict, module: ModuleType):
        return module.config_from_hf(hf_config)

    def hf_module(self, config, base: dict) -> ModuleType:
        """The conversion module an export writes (the first of ``hf_types``)."""
        return next(iter(self.hf_types.values()))

    def config_to_hf(self, config, base: dict | None = None) -> dict:
        """HF config.json of ``config``, on top of ``base`` (the config it was imported from)."""
        return self._merged(base, self.hf_module(config, base or {}).config_to_hf(config, base or {}))

    @staticmethod
    def _merged(base: dict | None, ours: dict) -> dict:
        """``ours`` over the fields of ``base`` it does not set, unless the model changed kind."""
        base = base or {}
        if base.get("model_type", ours["model_type"]) != ours["model_type"]:
            base = {}  # nothing of the old config applies
        return common.merge_config(base, ours)

    def complete_params(self, config, params: dict, module: ModuleType) -> dict:
        """Params HF does not store (BLIP-2's ITC temperature)."""
        return params

    # A HF directory that is more than one architecture's conversion (LLaMA-Adapter: a LlamaForCausalLM
    # directory plus the family's own files beside it): the family reads and writes it itself.
    writes_hf_dir: bool = False

    def owns_hf_dir(self, model_dir: str) -> bool:
        return False

    def read_hf_dir(self, model_dir: str) -> Pretrained:
        raise NotImplementedError

    def write_hf_dir(self, out_dir: str, config, params, hf_config: dict, assets_dir: str | None = None):
        raise NotImplementedError

    # -- inputs for inference

    def prepare_inputs(self, config, assets: str, prompt: str, images) -> Inputs:
        """Tokens and pixels as the family's HF processor makes them: a text-only decoder here."""
        if images:
            raise UsageError("this is a text-only model: --image is not accepted")
        tokenizer = load_tokenizer(assets)
        return Inputs(tokenizer, tokenizer(prompt, return_tensors="np")["input_ids"][0].tolist())

    def chat_prompt(self, config, turns: list[tuple[str, list]], eos: str = "</s>") -> str:
        """The prompt of a conversation for a model with no chat template: ``turns`` are ``(role,
        parts)`` (role ``system``, ``user`` or ``assistant``; a part is a text, or None for an image, in
        order), ending with the user's turn. This default is LLaVA-1.5's conversation format (each image
        of a turn as ``<image>\\n`` before its text, the answers closed by ``eos``)::

            [SYSTEM ]USER: <image>\\nQUESTION ASSISTANT: ANSWER</s>USER: ... ASSISTANT:
        """
        out = []
        for role, parts in turns:
            images = "".join(f"{IMAGE_TOKEN}\n" for p in parts if p is None)
            text = " ".join(p for p in parts if p is not None)
            if role == "system":
                out.append(f"{text} ")
            elif role == "user":
                out.append(f"USER: {images}{text} ")
            else:
                out.append(f"ASSISTANT: {images}{text}{eos}")
        return "".join(out) + "ASSISTANT:"


def config_from_dict(cls, d: dict):
    """Rebuild a (nested) frozen config; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------- saved HF assets


@functools.lru_cache(maxsize=8)
def load_processor(assets: str):
    """The saved HF processor, loaded once per directory (``evaluate`` prepares many examples)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(assets, trust_remote_code=False)


@functools.lru_cache(maxsize=8)
def load_tokenizer(assets: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets, trust_remote_code=False)


def token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def check_placeholders(prompt: str, placeholder: str, images) -> None:
    n = prompt.count(placeholder)
    if n != len(images):
        raise UsageError(
            f"the prompt has {n} {placeholder} placeholder(s) but {len(images)} --image "
            f"file(s) were given; put one {placeholder} where each image goes"
        )


def to_nhwc(pixel_values) -> np.ndarray:
    """A processor's ``pixel_values`` ``[I, C, H, W]`` -> our ``[1, I, H, W, C]``."""
    return np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1)[None]


def image_spec_of_assets(assets: str) -> ImageSpec:
    """How the processor saved in ``assets`` prepares images. IdeficsImageProcessor (``image_size``: a
    plain bicubic resize to a square) is read here, the CLIP/SigLIP/BLIP kinds by ImageSpec itself."""
    d = processor_config(assets)
    if "image_size" in d and "size" not in d:
        return ImageSpec(
            size=int(d["image_size"]), mean=tuple(d["image_mean"]), std=tuple(d["image_std"]), mode="resize"
        )
    return ImageSpec.from_processor_config(d)


def processor_config(assets: str) -> dict:
    """The image processor's settings saved in ``assets`` (processor or preprocessor config)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = os.path.join(assets, name)
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            if "image_processor" in d:
                return d["image_processor"]
            if "image_mean" in d:
                return d
    raise ConfigError(
        f"{assets}: no image processor config (processor_config.json / preprocessor_config.json)"
    )
