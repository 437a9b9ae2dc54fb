"""Image loading and preprocessing on the host (PIL + numpy), matching HF image processors.

The vision towers are imported from HF checkpoints, so the pixels they see in training must be the
pixels HF's processor would give them: same resampling filter (PIL bicubic on uint8), same crop
arithmetic, same float32 rescale/normalize. ``ImageSpec.from_processor_config`` reads those settings
from a checkpoint's ``preprocessor_config.json`` so they are never retyped by hand.
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mllm_jax import paths
from mllm_jax.errors import BadExample

MODES = ("crop", "resize", "pad")

# HF's defaults for the processor classes we read (CLIP-family vs SigLIP-family).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How raw images become model inputs ``f32[size, size, 3]``.

    mode: ``"crop"`` (CLIPImageProcessor: shortest edge -> ``shortest_edge``, then center crop),
    ``"resize"`` (SiglipImageProcessor: straight to ``size x size``), ``"pad"`` (LLaVA-1.5's
    ``image_aspect_ratio="pad"``: pad to a square with the mean color, then resize).
    """

    size: int
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    mode: str = "crop"
    shortest_edge: int | None = None  # "crop" only: resize target of the short side; None = size
    rescale: float = 1 / 255

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.size <= 0 or len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"need size > 0 and 3-channel mean/std: {self}")

    @classmethod
    def from_processor_config(cls, d: dict[str, Any], mode: str | None = None) -> ImageSpec:
        """From a HF ``preprocessor_config.json`` dict (or ``processor_config.json`` with an
        ``"image_processor"`` entry). ``mode`` overrides the inferred one; "pad" is never inferred because
        LLaVA keeps ``image_aspect_ratio`` in the model config, not the processor's."""
        d = d.get("image_processor", d)
        kind = str(d.get("image_processor_type", ""))
        siglip_like = kind.lower().startswith("siglip")
        size = d.get("size", 224)
        crop = d.get("crop_size")
        do_crop = d.get("do_center_crop", not siglip_like and crop is not None)
        if isinstance(size, dict) and "shortest_edge" in size:
            short = int(size["shortest_edge"])
            if do_crop:
                out = _square_side(crop if crop is not None else short)
                inferred, shortest = "crop", short
            else:
                # Shortest-edge resize without a crop gives non-square images; the towers need squares.
                raise ValueError(f"unsupported processor config (shortest_edge without center crop): {d}")
        else:
            out = _square_side(size)
            inferred, shortest = "resize", None
            if do_crop and crop is not None and _square_side(crop) != out:
                inferred, shortest, out = "crop", out, _square_side(crop)
        if d.get("do_normalize", True):
            mean = tuple(d.get("image_mean", IMAGENET_STANDARD_MEAN if siglip_like else OPENAI_CLIP_MEAN))
            std = tuple(d.get("image_std", IMAGENET_STANDARD_STD if siglip_like else OPENAI_CLIP_STD))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0
        resample = d.get("resample", 3)
        if resample != 3:  # 3 = PIL bicubic, what every CLIP/SigLIP checkpoint uses
            raise ValueError(f"only bicubic resampling (3) is supported, got {resample}")
        mode = mode or inferred
        if mode != "crop":
            shortest = None
        return cls(size=out, mean=mean, std=std, mode=mode, shortest_edge=shortest, rescale=rescale)

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """PIL image or uint8 ``[H, W, 3]`` -> normalized ``f32[size, size, 3]``."""
        image = to_rgb(image)
        if self.mode == "pad":
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        if self.mode == "crop":
            w, h = image.size
            short = self.shortest_edge or self.size
            # Same integer arithmetic as HF's get_resize_output_image_size(default_to_square=False).
            if w <= h:
                new_w, new_h = short, int(short * h / w)
            else:
                new_w, new_h = int(short * w / h), short
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            pixels = center_crop(np.asarray(image), self.size)
        else:
            pixels = np.asarray(image.resize((self.size, self.size), Image.Resampling.BICUBIC))
        # float64 then float32 at the end, as HF's rescale does: the last ulp must agree.
        x = (pixels.astype(np.float64) * self.rescale).astype(np.float32)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def _square_side(size: Any) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"):
        return int(size["height"])
    raise ValueError(f"expected a square size, got {size}")


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """RGB PIL image; transparency composited on white as HF's ``convert_to_rgb`` does."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise BadExample("bad_image", f"need a uint8 [H, W(, C)] array, got {image.dtype}{image.shape}")
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple) -> Image.Image:
    """LLaVA's ``expand2square``: centered on a square canvas of color ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def center_crop(pixels_HxWxC: np.ndarray, size: int) -> np.ndarray:
    """Center ``size x size`` crop, zero padded when the image is smaller (as HF does)."""
    h, w = pixels_HxWxC.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        pads = ((-(-ph // 2), ph - -(-ph // 2)), (-(-pw // 2), pw - -(-pw // 2)), (0, 0))
        pixels_HxWxC = np.pad(pixels_HxWxC, pads)
        h, w = pixels_HxWxC.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return pixels_HxWxC[top : top + size, left : left + size]


def load_image(source: str | os.PathLike | bytes | np.ndarray | Image.Image) -> Image.Image:
    """A fully decoded PIL image from a path, encoded bytes, a uint8 array or an image.

    Raises ``BadExample`` for missing, unreadable or truncated files: decoding is forced here (PIL is
    lazy) so a truncated JPEG fails now, inside the pipeline's skip logic, not later in a batch.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return to_rgb(source)
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            with Image.open(io.BytesIO(bytes(source))) as im:
                im.load()
                return im.copy()
        if paths.is_remote(source):  # a bucket object: read it whole, then decode
            with paths.open_file(str(source), "rb") as f:
                return load_image(f.read())
        with Image.open(source) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as e:
        raise BadExample("missing_image", str(source)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # PIL reports truncation as OSError and some corrupt headers as SyntaxError/ValueError.
        name = "<bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(source)
        raise BadExample("bad_image", f"{name}: {e}") from e


def safe_join(root: str | os.PathLike, relative: str) -> str:
    """``root/relative``, refusing (``BadExample("unsafe_path")``) paths that leave ``root``: absolute
    paths, ``..`` climbing out, and symlinks inside ``root`` that resolve outside it. Dataset files are
    data, not trusted paths. ``root`` itself may be a symlink (an image folder on another disk); a link
    inside it must stay inside its target. A path that is empty or not a string is ``bad_path``."""
    if not isinstance(relative, str) or not relative:
        raise BadExample("bad_path", f"image path must be a non-empty string: {relative!r}")
    if os.path.isabs(relative) or relative[0] in "/\\" or "://" in relative:
        raise BadExample("unsafe_path", f"image path must be relative: {relative!r}")
    if paths.is_remote(root):  # a bucket has no links: the normalised path must stay below the root
        inside = posixpath.normpath(relative)
        if inside == ".." or inside.startswith("../"):
            raise BadExample("unsafe_path", f"image path escapes the image root: {relative!r}")
        return paths.join(str(root), inside)
    base = os.path.abspath(root)
    path = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, path]) != base:
        raise BadExample("unsafe_path", f"image path escapes the image root: {relative!r}")
    real_base = os.path.realpath(base)
    if os.path.commonpath([real_base, os.path.realpath(path)]) != real_base:
        raise BadExample("unsafe_path", f"image path resolves outside the image root: {relative!r}")
    return path
