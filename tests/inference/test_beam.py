"""Beam search token ids equal transformers' ``generate(num_beams=k, do_sample=False)`` for LLaVA and
BLIP-2 (tiny random HF models), with the model's EOS and with a frequent token as EOS (so that beams end
early and the finished-hypotheses bookkeeping and the early-stopping heuristic decide the answer)."""

import blip2_fixtures
import hf_fixtures
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


def test_explain_refuses_a_model_without_patch_tokens(blip2_dir, image_files):
    """(Here for the BLIP-2 dir this module builds.) BLIP-2's LLM sees query tokens, not patches: one
    clear line instead of a wrong map."""
    with pytest.raises(errors.UsageError, match="one per patch"):
        predict.predict(blip2_dir, "question : what is it ? answer :", image_files[:1], max_new_tokens=2,
                        explain_path="/nonexistent/x.png")  # fmt: skip
