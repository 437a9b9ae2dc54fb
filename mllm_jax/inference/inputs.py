"""A prompt with images, prepared as the model's own HF processor prepares it (``Family.prepare_inputs``),
plus what decoding needs from the saved HF assets (EOS ids)."""

from __future__ import annotations

import json
import os

from mllm_jax import families
from mllm_jax.errors import UsageError
from mllm_jax.families import Inputs


def load_images(paths) -> list:
    """PIL RGB images of ``paths``; a missing or unreadable file is a ``UsageError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--image {path!r}: no such file")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"--image {path!r}: not a readable image ({e})") from None
    return images


def eos_token_ids(assets: str, hf_config: dict, tokenizer) -> list[int]:
    """EOS ids as HF ``generate`` would use them: generation_config.json, else the (text) config."""
    path = os.path.join(assets, "generation_config.json")
    eos = None
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = hf_config.get("eos_token_id", (hf_config.get("text_config") or {}).get("eos_token_id"))
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def prepare_inputs(family: str, config, assets: str, prompt: str, images) -> Inputs:
    """Tokens and pixels as the model's own HF processor prepares them (prompt conventions included)."""
    if family not in families.FAMILIES:
        raise UsageError(f"predict does not support {family!r} models")
    f = families.FAMILIES[family]
    if f.frames_per_media(config) > 1:  # the HF processors lay out one image per <image>
        raise UsageError(
            f"predict does not support clips merged into one media item (frames_per_clip="
            f"{f.frames_per_media(config)}); use evaluate --task=synthetic_video"
        )
    return f.prepare_inputs(config, assets, prompt, images)
