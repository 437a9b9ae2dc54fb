"""Image preprocessing matches HF's processors; image loading and path joining fail cleanly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mllm_jax.data.transforms import ImageSpec, expand_to_square, load_image, safe_join
from mllm_jax.errors import BadExample

SIZES = ((17, 23), (31, 9), (40, 40), (5, 7), (64, 33))  # (H, W): odd, tall, square, upscaled, wide


def _image(seed: int, hw: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, size=(*hw, channels), dtype=np.uint8), mode)


def _hf(processor, image) -> np.ndarray:
    return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_crop_matches_clip_processor(mode):
    hf = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    spec = ImageSpec.from_processor_config(hf.to_dict())
    assert (spec.mode, spec.size, spec.shortest_edge) == ("crop", 16, 16)
    for seed, hw in enumerate(SIZES):
        image = _image(seed, hw, mode)
        out = spec(image)
        assert out.dtype == np.float32 and out.shape == (16, 16, 3)
        np.testing.assert_allclose(out, _hf(hf, image), atol=1e-5)


def test_crop_with_larger_resize_matches_clip_processor():
    hf = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 14, "width": 14})
    spec = ImageSpec.from_processor_config({"image_processor": hf.to_dict()})  # processor_config.json layout
    assert (spec.size, spec.shortest_edge) == (14, 20)
    for seed, hw in enumerate(SIZES):
        np.testing.assert_allclose(spec(_image(seed, hw)), _hf(hf, _image(seed, hw)), atol=1e-5)


def test_resize_matches_siglip_processor():
    hf = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    spec = ImageSpec.from_processor_config(hf.to_dict())
    assert (spec.mode, spec.size, spec.mean) == ("resize", 16, (0.5, 0.5, 0.5))
    for seed, hw in enumerate(SIZES):
        image = _image(seed, hw)
        np.testing.assert_allclose(spec(image), _hf(hf, image), atol=1e-5)
        np.testing.assert_allclose(spec(np.asarray(image)), _hf(hf, image), atol=1e-5)  # arrays too


def test_pad_is_llava_expand2square_then_clip():
    hf = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    spec = ImageSpec.from_processor_config(hf.to_dict(), mode="pad")
    fill = tuple(int(m * 255) for m in hf.image_mean)
    for seed, hw in enumerate(SIZES):
        image = _image(seed, hw)
        np.testing.assert_allclose(spec(image), _hf(hf, expand_to_square(image, fill)), atol=1e-5)
    wide = spec(Image.new("RGB", (40, 8), (255, 255, 255)))
    assert np.abs(wide[0]).max() < 0.02  # padding rows are the mean color, ~0 after normalization
    assert np.allclose(wide[8], (1 - np.asarray(spec.mean)) / np.asarray(spec.std), atol=1e-5)


def test_from_processor_config_rejects_unsupported():
    with pytest.raises(ValueError, match="bicubic"):
        ImageSpec.from_processor_config({"size": {"height": 8, "width": 8}, "resample": 2})
    with pytest.raises(ValueError, match="square"):
        ImageSpec.from_processor_config({"size": {"height": 8, "width": 6}})
    with pytest.raises(ValueError, match="mode"):
        ImageSpec(8, mode="stretch")


def test_load_image(tmp_path):
    image = _image(0, (6, 5))
    path = tmp_path / "ok.png"
    image.save(path)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(image))

    with pytest.raises(BadExample) as e:
        load_image(str(tmp_path / "missing.png"))
    assert e.value.reason == "missing_image"

    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    truncated = io.BytesIO()
    _image(1, (64, 64)).save(truncated, "PNG")
    (tmp_path / "cut.png").write_bytes(truncated.getvalue()[:200])
    for bad in (str(tmp_path / "junk.jpg"), str(tmp_path / "cut.png"), b"\x89PNG\r\n"):
        with pytest.raises(BadExample) as e:
            load_image(bad)
        assert e.value.reason == "bad_image"


def test_safe_join(tmp_path):
    root = str(tmp_path)
    assert safe_join(root, "coco/train2017/1.jpg") == str(tmp_path / "coco" / "train2017" / "1.jpg")
    assert safe_join(root, "a/../b.jpg") == str(tmp_path / "b.jpg")
    for bad in ("../secret.jpg", "a/../../secret.jpg", "/etc/passwd", "coco/../../x"):
        with pytest.raises(BadExample) as e:
            safe_join(root, bad)
        assert e.value.reason == "unsafe_path"
    for bad in ("", None):
        with pytest.raises(BadExample) as e:
            safe_join(root, bad)
        assert e.value.reason == "bad_path"


def test_safe_join_refuses_symlinks_out_of_the_root(tmp_path):
    outside, root = tmp_path / "outside", tmp_path / "root"
    outside.mkdir()
    (root / "coco").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dir").symlink_to(outside)
    (root / "coco" / "ok.png").symlink_to(root / "coco" / "real.png")  # a link that stays inside
    for bad in ("link.png", "dir/secret.png"):
        with pytest.raises(BadExample) as e:
            safe_join(str(root), bad)
        assert e.value.reason == "unsafe_path"
    assert safe_join(str(root), "coco/ok.png") == str(root / "coco" / "ok.png")
    # The root itself may be a link (an image folder on another disk).
    (tmp_path / "root_link").symlink_to(root)
    assert safe_join(str(tmp_path / "root_link"), "coco/ok.png") == str(
        tmp_path / "root_link" / "coco" / "ok.png"
    )
