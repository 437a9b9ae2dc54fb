"""What a family that ``main`` trains adds to ``Family``: sizing from ``config.model`` (from scratch or
from pretrained parts), the tokens it adds, the processor saved with a run, where images sit in the
sequence, FLOPs, and the stage losses it supports."""

from __future__ import annotations

import dataclasses

from mllm_jax import schema
from mllm_jax.data.layouts import ModelSpec
from mllm_jax.errors import ConfigError, ConversionError
from mllm_jax.families.base import Family


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitSettings:
    """``config.model.init``: the weights a run starts from (all empty: from scratch)."""

    hf: str = ""  # a whole HF directory of the family
    vision: str = ""  # a HF vision tower directory, with `llm` (the adapter starts from scratch)
    llm: str = ""  # a HF LLaMA-family directory, with `vision`
    checkpoint: str = ""  # one of our checkpoints or training workdirs


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """``config.model``: the keys every family reads; a family file adds its own (``settings_cls``).
    ``vision`` / ``llm`` (and the adapter's groups) are the fields of the part's config dataclass."""

    family: str = "llava"
    init: InitSettings = dataclasses.field(default_factory=InitSettings)
    tokenizer: str = "builtin"  # "builtin" (the synthetic vocabulary), a HF dir, or "": the init dir's
    # True: PaliGemma's <loc0000>..<loc1023> join the tokenizer and the embeddings (boxes as text)
    location_tokens: bool = False
    vision: dict = dataclasses.field(default_factory=dict)  # the tower's sizes
    llm: dict = dataclasses.field(default_factory=dict)  # the decoder's; vocab_size: the tokenizer's if unset
    frames_per_clip: int = 1  # video: images per clip
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # from scratch; a pretrained tower brings its own
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    remat: str = "none"  # none | full | minimal | save_dots (models/layers.py REMAT_POLICIES)
    scan_layers: bool = False  # nn.scan over layers: one compiled layer body (same numbers)

    def tokenizers(self) -> dict[str, str]:
        """Config key -> tokenizer directory the run reads ("" / "builtin": none to read)."""
        return {"tokenizer": self.tokenizer}

    def check(self, where: str):
        for key in ("location_tokens", "scan_layers"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{where}{key} must be True or False, got {getattr(self, key)!r}")
        schema.positive(self.frames_per_clip, where + "frames_per_clip")


class TrainableFamily(Family):
    trains = True
    settings_cls: type[ModelSettings] = ModelSettings  # what config.model holds for this family
    special_tokens: tuple[str, ...] = ()  # added to the tokenizer when missing
    vision_family: str = "vit"  # the family of a `model.init.vision` directory
    image_mode: str = "resize"  # how its HF image processor fits images to the tower (ImageSpec.mode)
    nested_text_config: bool = True  # the HF config holds the decoder's fields under "text_config"
    # new tokens (<image>) grow the LLM's tables (LLaVA); False: they go to a separate table (IDEFICS)
    grows_vocab: bool = False
    losses: tuple[str, ...] = ("lm",)  # the stage losses (config.stages.*.loss) it supports
    starts_from_parts: bool = False  # a pretrained tower + LLM (model.init.vision/llm) can start it
    cannot_pack: str = ""  # why its rows cannot hold several examples (data.packing); "": they can

    def pack_refusal(self, m: ModelSettings) -> str:
        """Why a model of these settings cannot train on packed rows; "": it can."""
        return self.cannot_pack

    def scratch(self, m: ModelSettings, tokenizer):
        """The model config from the sizes in ``config.model`` and the tokenizer."""
        raise NotImplementedError

    def from_parts(self, m: ModelSettings, vision, llm, tokenizer):
        """The model config around a pretrained vision tower and LLM (``model.init.vision/llm``), for
        the families that ``starts_from_parts``."""
        raise NotImplementedError

    def processor(self, config, tokenizer, image_processor, qformer_tokenizer=None):
        """The HF processor saved with a run, so that its checkpoints load in transformers."""
        raise NotImplementedError

    def model_spec(self, config, tokenizer) -> ModelSpec:
        """What the data pipeline needs to lay out images in the token sequence."""
        raise NotImplementedError

    def flops_per_sequence(self, config, seq_len: int, images: int = 1) -> float:
        raise NotImplementedError

    def config_to_hf(self, config, base: dict | None = None) -> dict:
        if self.frames_per_media(config) > 1:
            # IDEFICS with frame embeddings, or a clip pooled into one block: transformers has neither
            raise ConversionError(
                f"{self.name} with frames_per_clip={config.frames_per_clip} merges each clip into one media "
                "item (frame embeddings, or video_pool='mean'): transformers has no equivalent, so it is not "
                "exported"
            )
        return super().config_to_hf(config, base)


def llm_sizes(m: ModelSettings, tokenizer) -> dict:
    """``model.llm`` with the vocab size: the tokenizer's, unless the config names a larger one (the
    7B/13B presets name LLaMA's 32000, so that they build at their real size with no tokenizer dir)."""
    sizes = {"vocab_size": len(tokenizer), **m.llm}
    if sizes["vocab_size"] < len(tokenizer):
        raise ConfigError(
            f"config.model.llm.vocab_size {sizes['vocab_size']} < the tokenizer's {len(tokenizer)} tokens"
        )
    return sizes


def video_settings(m) -> dict:
    """LLaVA / BLIP-2 clip settings (``model.frames_per_clip`` / ``model.video_pool``)."""
    return dict(frames_per_clip=m.frames_per_clip, video_pool=m.video_pool)
