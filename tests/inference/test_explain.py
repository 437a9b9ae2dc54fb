"""Attention maps (``predict --explain``): the attention probabilities they are made of equal
transformers' own on the same sequence, per layer and head (LLaVA: ``output_attentions``; IDEFICS: the
gated cross-attention modules' weights and the perceiver's; BLIP-2: tests/inference/test_beam.py); the
map is their mean over the answer's tokens and heads, and the layers or one."""

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


def _hf_perceiver_probs(attn, context, latents):
    """HF ``IdeficsPerceiverAttention.forward``'s attention probabilities (its own modules, its lines up to
    the softmax): ``[B, N, Q, P + Q]``."""
    context, latents = attn.context_layer_norm(context), attn.latents_layer_norm(latents)
    b = context.shape[0]
    q = attn.q_proj(latents)
    k = attn.k_proj(torch.cat([context, latents], dim=-2))
    q, k = [x.reshape(b, x.shape[1], attn.n_heads, attn.head_dim).transpose(1, 2) for x in (q, k)]
    if attn.qk_layer_norms:
        q, k = attn.q_layer_norm(q), attn.k_layer_norm(k)
    return torch.einsum("... i d, ... j d -> ... i j", q * attn.qk_scale, k).softmax(dim=-1)


def test_idefics_cross_attention_map_equals_hf(image_files, tmp_path):
    """IDEFICS: the gated cross-attention probabilities equal HF's (eager ``cross_attn`` modules' weights,
    which ``output_attentions`` does not return), and with a resampler the map composes HF's perceiver
    probabilities as explain's docstring says; two images, each answer token seeing the latest."""
    import idefics_fixtures
    from transformers import IdeficsForVisionText2Text

    path = str(tmp_path / "idefics")
    # the resampler and qk norms in both attentions (without a resampler the keys are the patches: the
    # same cross-attention, no composition)
    variant = idefics_fixtures.IDEFICS_VARIANTS["vector_i2_resampler_qk_addvocab"]
    idefics_fixtures.build_idefics(path, seed=3, **variant)
    idefics_fixtures.make_processor().save_pretrained(path)
    images = [Image.open(f).convert("RGB") for f in image_files[:2]]
    prompt = "User: <image> what is in this picture ? <image> describe it . Assistant :"
    answer = [5, 9, 7, 11]  # any tokens: decoding them is predict's part (tested on LLaVA and BLIP-2)
    pre, assets = store.load_any(path)
    inputs = prepare_inputs(pre.family, pre.config, assets, prompt, images)
    model = families.build(pre.family, inputs.config)
    ours = explain.explain(model, pre.params, inputs.tokens, answer, inputs.pixels)
    explain.save_heatmaps(str(tmp_path / "x.png"), inputs.pixels, ours)
    assert Image.open(tmp_path / "x.png").size == (2 * 336, 336)  # the two images side by side

    hf = IdeficsForVisionText2Text.from_pretrained(path, attn_implementation="eager").eval()
    cross, perceiver = [], []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, i, o: cross.append(o[1]))
             for layer in hf.model.gated_cross_attn_layers]  # fmt: skip
    hooks += [block[0].register_forward_hook(lambda m, i, o: perceiver.append(_hf_perceiver_probs(m, *i)))
              for block in hf.model.perceiver_resampler.blocks]  # fmt: skip
    sequence = inputs.tokens + answer[:-1]
    t, a = len(sequence), len(answer)
    image_ids = np.cumsum(np.asarray(sequence) == inputs.config.image_token_id) - 1
    image_mask = torch.tensor((image_ids[:, None] == np.arange(2))[None], dtype=torch.long)
    pixel_values = torch.tensor(inputs.pixels.transpose(0, 1, 4, 2, 3))
    with torch.no_grad():
        hf(input_ids=torch.tensor([sequence]), pixel_values=pixel_values, image_attention_mask=image_mask)
    for h in hooks:
        h.remove()
    expected_JxNxAxS = np.stack([c[0, :, t - a :].numpy() for c in cross])
    np.testing.assert_allclose(ours.image_attention_LxNxAxS, expected_JxNxAxS, atol=1e-5)
    assert ours.image_attention_LxNxAxS[:, :, :, : inputs.config.tokens_per_image].sum() < 1e-6  # 2nd image
    per_layer = expected_JxNxAxS.mean(axis=(1, 2)).reshape(len(cross), 2, -1)
    assert len(cross) == 2 and len(perceiver) == 2  # 4 layers at interval 2; 2 resampler blocks
    p, share = inputs.config.vision.num_positions, None
    for probs in perceiver:  # the latents' shares of the patches, composed over the blocks
        a_BxQxS = probs.mean(dim=1).numpy()
        share = a_BxQxS[..., :p] if share is None else a_BxQxS[..., :p] + a_BxQxS[..., p:] @ share
    per_layer = np.einsum("jmq,mqp->jmp", per_layer, share)
    grid = inputs.config.vision.image_size // inputs.config.vision.patch_size
    per_layer = per_layer[..., 1:].reshape(len(cross), 2, grid, grid)  # CLIP's class token left out
    np.testing.assert_allclose(ours.per_layer_LxIxGxG, per_layer, atol=1e-5)
    np.testing.assert_allclose(ours.maps_IxGxG, per_layer.mean(axis=0), atol=1e-6)
    # (--explain_layer picks per_layer[layer] as for LLaVA, where it is tested: no third forward pass here)
