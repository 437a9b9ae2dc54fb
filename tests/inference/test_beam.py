"""Beam search token ids equal transformers' ``generate(num_beams=k, do_sample=False)`` for LLaVA and
BLIP-2 (tiny random HF models), with the model's EOS and with a frequent token as EOS (so that beams end
early and the finished-hypotheses bookkeeping and the early-stopping heuristic decide the answer)."""

import blip2_fixtures
import hf_fixtures
import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from mllm_jax import errors, families, predict
from mllm_jax.families import store
from mllm_jax.inference import beam
from mllm_jax.inference.inputs import prepare_inputs

MAX_NEW = 12


def compare(model_dir, hf_model, prompt, image, num_beams, eos):
    """``(ours, transformers', transformers' greedy)`` ids for one prompt."""
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref, greedy = (
            hf_model.generate(
                **inputs, do_sample=False, num_beams=k, max_new_tokens=MAX_NEW, eos_token_id=eos
            )[0, n:].tolist()
            for k in (num_beams, 1)
        )
    pre, assets = store.load_any(model_dir)
    inp = prepare_inputs(pre.family, pre.config, assets, prompt, [image])
    model = families.build(pre.family, inp.config or pre.config)
    ids, _ = beam.beam_search(
        model, pre.params, inp.tokens, inp.pixels, num_beams=num_beams, max_new_tokens=MAX_NEW,
        eos_ids=[eos], embed_kwargs=inp.embed_kwargs,
    )  # fmt: skip
    return ids, ref, greedy


# (image seed, num_beams, eos id): one beam count, one compilation; 2 is the tokenizer's </s>, 25 a
# token the models like
CASES = [
    (0, 3, 2),
    (3, 3, 2),
    (1, 3, 25),
]


def test_llava_beam_search_equals_hf(llava_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model_dir = llava_dir("clip_default")
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    prompt = "USER : <image> describe this picture . ASSISTANT :"
    differs = False
    for seed, k, eos in CASES:
        image = hf_fixtures.random_image(seed)
        ids, ref, greedy = compare(model_dir, hf, prompt, image, k, eos)
        assert ids == ref, (seed, k, eos)
        differs |= ids != greedy
        if eos == 2:  # the model's own EOS: predict --num_beams gives the same
            path = str(tmp_path / f"{seed}.png")
            image.save(path)
            out = predict.predict(model_dir, prompt, [path], max_new_tokens=MAX_NEW, num_beams=k)
            assert out["token_ids"] == ref and isinstance(out["score"], float)
    assert differs  # beam search is not greedy search in disguise here
    with pytest.raises(errors.UsageError, match="num_beams"):
        predict.predict(model_dir, prompt, [path], num_beams=2, temperature=0.7)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import Blip2Processor, BlipImageProcessor

    path = str(tmp_path_factory.mktemp("beam_blip2"))
    blip2_fixtures.build_blip2(path, text="opt", cross_attention_frequency=1, seed=4)
    size = blip2_fixtures.IMAGE_SIZE
    Blip2Processor(
        BlipImageProcessor(size={"height": size, "width": size}),
        blip2_fixtures.make_tokenizer(),
        num_query_tokens=blip2_fixtures.NUM_QUERY_TOKENS,
    ).save_pretrained(path)
    return path


def test_blip2_beam_search_equals_hf(blip2_dir):
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    differs = False
    for seed, k, eos in CASES:
        image = hf_fixtures.random_image(seed)
        ids, ref, greedy = compare(blip2_dir, hf, "question : what is it ? answer :", image, k, eos)
        assert ids == ref, (seed, k, eos)
        differs |= ids != greedy
    assert differs


def test_blip2_explain_equals_hf_attentions(blip2_dir, image_files, tmp_path):
    """(Here for the BLIP-2 dir this module builds.) ``--explain``'s map on BLIP-2: the Q-Former's
    cross-attention onto the patches and the LLM's attention onto the query tokens equal HF's
    ``output_attentions`` (the Q-Former's ``cross_attentions``, ``language_model_outputs.attentions``);
    the map is the queries' patch attention weighted by the answer's attention to each query."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration

    from mllm_jax.inference import explain

    prompt = "Question: what is it ? Answer:"
    pre, assets = store.load_any(blip2_dir)
    image = Image.open(image_files[0]).convert("RGB")
    inputs = prepare_inputs(pre.family, pre.config, assets, prompt, [image])
    model = families.build(pre.family, pre.config)
    answer = [5, 9, 7]  # any tokens: decoding them is predict's part (its --explain path: test_explain.py)
    ours = explain.explain(model, pre.params, inputs.tokens, answer, inputs.pixels)
    explain.save_heatmaps(str(tmp_path / "x.png"), inputs.pixels, ours)
    assert Image.open(tmp_path / "x.png").size == (336, 336)

    hf = Blip2ForConditionalGeneration.from_pretrained(blip2_dir, attn_implementation="eager").eval()
    sequence = torch.tensor([inputs.tokens + answer[:-1]])
    pixel_values = torch.tensor(inputs.pixels[:, 0].transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = hf(input_ids=sequence, pixel_values=pixel_values, output_attentions=True)
        # the model does not pass output_attentions on to its Q-Former: asked of the Q-Former itself
        image_embeds = hf.vision_model(pixel_values=pixel_values).last_hidden_state
        qformer = hf.qformer(
            query_embeds=hf.query_tokens.expand(1, -1, -1),
            encoder_hidden_states=image_embeds,
            output_attentions=True,
        )
    cross_LxNxQxP = np.stack([x[0].numpy() for x in qformer.cross_attentions])
    np.testing.assert_allclose(ours.qformer_attention_LxNxQxP, cross_LxNxQxP, atol=1e-5)
    t, a = sequence.shape[1], len(answer)
    queries = np.flatnonzero(np.asarray(inputs.tokens) == pre.config.image_token_id)
    llm = np.stack([x[0].numpy() for x in out.language_model_outputs.attentions])[:, :, t - a :][..., queries]
    np.testing.assert_allclose(ours.image_attention_LxNxAxS, llm, atol=1e-5)
    grid = pre.config.vision.image_size // pre.config.vision.patch_size
    per_layer = np.einsum("q,lqp->lp", llm.mean(axis=(0, 1, 2)), cross_LxNxQxP.mean(axis=1))
    per_layer = per_layer[:, 1:].reshape(-1, 1, grid, grid)  # EVA's class token left out
    np.testing.assert_allclose(ours.per_layer_LxIxGxG, per_layer, atol=1e-6)
    np.testing.assert_allclose(ours.maps_IxGxG, per_layer.mean(axis=0), atol=1e-6)
