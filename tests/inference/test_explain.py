"""Attention maps (``predict --explain``): the answer's attention onto the image tokens equals
transformers' own attention probabilities (``output_attentions``, eager attention) on the same sequence,
per layer and head; the map is their mean over the answer's tokens and heads, and the layers or one."""

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_jax import errors, families, predict
from mllm_jax.families import store
from mllm_jax.inference import explain
from mllm_jax.inference.inputs import prepare_inputs

PROMPT = "USER : <image> what is in this picture ? ASSISTANT :"


def test_attention_equals_hf_output_attentions_and_predict_writes_the_heatmap(
    llava_dir, image_files, tmp_path
):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = llava_dir("clip_default")
    out_png = str(tmp_path / "explain.png")
    result = predict.predict(model_dir, PROMPT, image_files[:1], max_new_tokens=6, explain_path=out_png)
    answer = result["token_ids"]
    assert result["explain"] == out_png and Image.open(out_png).size == (336, 336)

    pre, assets = store.load_any(model_dir)
    image = Image.open(image_files[0]).convert("RGB")
    inputs = prepare_inputs(pre.family, pre.config, assets, PROMPT, [image])
    model = families.build(pre.family, pre.config)
    ours = explain.explain(model, pre.params, inputs.tokens, answer, inputs.pixels)

    processor = AutoProcessor.from_pretrained(model_dir)
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    pixel_values = processor(images=[image], text=PROMPT, return_tensors="pt")["pixel_values"]
    sequence = torch.tensor([inputs.tokens + answer[:-1]])
    with torch.no_grad():
        attentions = hf(input_ids=sequence, pixel_values=pixel_values, output_attentions=True).attentions
    probs_LxNxTxT = np.stack([a[0].numpy() for a in attentions])
    image_cols = np.flatnonzero(np.asarray(inputs.tokens) == pre.config.image_token_id)
    t, a = sequence.shape[1], len(answer)
    expected = probs_LxNxTxT[:, :, t - a :][..., image_cols]
    np.testing.assert_allclose(ours.image_attention_LxNxAxS, expected, atol=1e-5)

    grid = pre.config.vision.image_size // pre.config.vision.patch_size
    per_layer = expected.mean(axis=(1, 2)).reshape(len(attentions), 1, grid, grid)  # CLIP "default": no cls
    np.testing.assert_allclose(ours.maps_IxGxG, per_layer.mean(axis=0), atol=1e-6)
    last = explain.explain(model, pre.params, inputs.tokens, answer, inputs.pixels, layer=-1)
    np.testing.assert_allclose(last.maps_IxGxG, per_layer[-1], atol=1e-6)
    assert not np.allclose(last.maps_IxGxG, ours.maps_IxGxG)  # one layer is not the mean
    with pytest.raises(errors.UsageError, match="explain_layer"):
        explain.explain(model, pre.params, inputs.tokens, answer, inputs.pixels, layer=len(attentions))


def test_heatmap_marks_the_attended_patch():
    pixels = np.zeros((16, 16, 3), np.float32)  # a black image: only the heatmap is red
    attention = np.zeros((4, 4))
    attention[1, 2] = 1.0  # row 1, column 2 of the patch grid
    heat = np.asarray(explain.heatmap_image(pixels, attention, size=64), np.float32)
    redness = heat[..., 0] - heat[..., 1:].mean(-1)
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    assert (y // 16, x // 16) == (1, 2)
