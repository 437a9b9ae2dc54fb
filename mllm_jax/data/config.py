"""One stage's data settings (``DataConfig``), including weighted mixes of several sources.

``mix`` is a tuple of dicts ``{"weight": w, <DataConfig field overrides>}``; when non-empty, the stage
reads from every component (the parent config with that component's overrides) in proportion to the
weights. The shapes of a batch (``max_length``, ``max_images``, ``text_length``) and the worker count
are the parent's: components cannot override them. Errors name the offending key (``data.mix[1].task``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

SOURCES = ("synthetic", "llava_json", "webdataset", "mmc4", "preference_json")
SYNTHETIC_TASKS = (
    "caption",
    "vqa",
    "interleaved",
    "interleaved_caption",
    "grounding",
    "referring",
    "video",
    "existence",
    "preference",
    "retrieval",
)
MULTI_IMAGE_TASKS = ("interleaved", "interleaved_caption")  # these need max_images >= 2
TEXT_SOURCES = ("all", "prompt")
PARENT_ONLY = ("mix", "max_length", "max_images", "text_length", "num_workers", "packing", "packed_images")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # a SOURCES entry
    # synthetic only: "caption" | "vqa" | "interleaved" (2..max_images images, one VQA turn each) |
    # "interleaved_caption" (documents: image, its caption, image, its caption, ...) |
    # "grounding" / "referring" (boxes as location tokens, grounding.py; needs model.location_tokens) |
    # "video" (clips of synthetic.num_frames frames, one motion question; needs max_images >= num_frames) |
    # "existence" (yes / no: is there a red circle ?) | "preference" (chosen / rejected pairs: a DPO
    # stage's data, existence.py); both need synthetic.existence_questions
    task: str = "vqa"
    path: str = ""  # llava_json / mmc4 / preference_json file, or webdataset shard dir/glob
    # llava_json / mmc4 / preference_json: the folder image paths are relative to (never left)
    image_root: str = ""
    template: str = "tiny"  # a templates.TEMPLATES key or "chat" (conversations; documents have none)
    max_length: int = 64  # tokens per sample incl. image tokens; padded to it, truncated beyond
    max_images: int = 1  # images per sample (padded with zero images)
    num_workers: int = 0  # grain worker processes (0 = in-process)
    shuffle: bool = True
    split: str = "train"  # synthetic: "train" | "heldout"
    size: int = 100_000  # synthetic: records per epoch
    mix: tuple = ()  # weighted components, see the module docstring
    # > 0: each example also carries the caption / question + answer / document text as
    # text_tokens, text_mask i32[text_length] in the text tokenizer's vocabulary (BLIP-2's Q-Former).
    text_length: int = 0
    # What text_tokens hold for a conversation: "all" (caption / question + answer: BLIP-2 stage 1) or
    # "prompt" (the rendered prompt before the last answer, images removed: the instruction
    # InstructBLIP's Q-Former reads, as InstructBlipProcessor gives it at inference). Documents: all.
    text_source: str = "all"
    # Fail once at least 200 records were read (pipeline.MIN_RECORDS_FOR_FRACTION) and more than this
    # share of them were skipped (per mix component): 5% tolerates a few dead links in a web-scale set
    # but catches a wrong image_root, template or file format early instead of training on the
    # surviving scraps. 1.0 disables the check. Images dropped from a kept document do not count.
    max_skipped_fraction: float = 0.05
    # Pack several examples into each max_length row (data/packing.py, docs/packing.md): positions
    # restart and attention stays within each example; images travel with their examples.
    packing: bool = False
    # packing: image slots per row (0: as many image blocks as max_length holds, <= 4 x max_images)
    packed_images: int = 0

    def __post_init__(self):
        mix = self.mix
        if not isinstance(mix, tuple | list):
            raise ValueError(f"data.mix must be a tuple of dicts, got {type(mix).__name__}")
        # ConfigDict components arrive as dicts after to_dict(); accept ConfigDicts given directly too.
        mix = tuple(c.to_dict() if hasattr(c, "to_dict") else c for c in mix)
        object.__setattr__(self, "mix", mix)
        _check(self, "data.")
        self.components()  # validates every component

    def components(self) -> tuple[tuple[float, DataConfig], ...]:
        """``((weight, config), ...)``: the mix's components, or ``((1.0, self),)`` without a mix."""
        if not self.mix:
            return ((1.0, self),)
        fields = [f.name for f in dataclasses.fields(DataConfig)]
        out = []
        for i, component in enumerate(self.mix):
            where = f"data.mix[{i}]."
            if not isinstance(component, Mapping):
                raise ValueError(f"data.mix[{i}] must be a dict of weight and overrides, got {component!r}")
            for key in component:
                if key == "weight":
                    continue
                if key in PARENT_ONLY:
                    raise ValueError(
                        f"{where}{key}: set it on the parent data config, all components share it"
                    )
                if key not in fields:
                    close = difflib.get_close_matches(str(key), fields, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(f"{where}{key} is not a data config key{hint}")
            weight = component.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
                raise ValueError(f"{where}weight must be a positive number, got {weight!r}")
            overrides = {k: v for k, v in component.items() if k != "weight"}
            config = _replace(self, overrides)
            _check(config, where)
            out.append((float(weight), config))
        return tuple(out)


def _replace(parent: DataConfig, overrides: dict[str, Any]) -> DataConfig:
    # Built field by field (not dataclasses.replace) so the component skips __post_init__'s mix check
    # and its errors can be reported under the component's name.
    config = object.__new__(DataConfig)
    for f in dataclasses.fields(DataConfig):
        object.__setattr__(config, f.name, overrides.get(f.name, getattr(parent, f.name)))
    object.__setattr__(config, "mix", ())
    return config


def _check(c: DataConfig, where: str) -> None:
    """One-line errors for values no run could use, naming the key under ``where``."""
    if c.source not in SOURCES:
        raise ValueError(f"{where}source must be one of {SOURCES}, got {c.source!r}")
    if c.source == "synthetic" and c.task not in SYNTHETIC_TASKS:
        raise ValueError(f"{where}task must be one of {SYNTHETIC_TASKS} for synthetic data, got {c.task!r}")
    if c.source == "synthetic" and c.task in MULTI_IMAGE_TASKS and c.max_images < 2:
        raise ValueError(f"{where}task {c.task!r} needs max_images >= 2, got {c.max_images}")
    if c.source != "synthetic" and not c.path:
        raise ValueError(f"{where}path is empty: source {c.source!r} reads a file or shards")
    checks = {
        "max_length": c.max_length >= 2,
        "max_images": c.max_images >= 1,
        "text_length": c.text_length >= 0,
        "num_workers": c.num_workers >= 0,
        "size": c.size >= 1,
        "packed_images": c.packed_images >= 0,
    }
    for key, ok in checks.items():
        if not ok:
            raise ValueError(f"{where}{key} is out of range: {getattr(c, key)!r}")
    if c.text_source not in TEXT_SOURCES:
        raise ValueError(f"{where}text_source must be one of {TEXT_SOURCES}, got {c.text_source!r}")
    if not 0.0 <= c.max_skipped_fraction <= 1.0:
        raise ValueError(f"{where}max_skipped_fraction must be in [0, 1], got {c.max_skipped_fraction!r}")
