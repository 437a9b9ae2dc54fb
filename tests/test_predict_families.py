"""`predict` for the Flamingo (IDEFICS) and BLIP-2 families against transformers' greedy `generate`
with the model's own processor (IdeficsProcessor's interleaved list, Blip2Processor's query tokens)."""

import blip2_fixtures
import idefics_fixtures
import numpy as np
import pytest
import torch
from PIL import Image

from mllm_jax import errors, predict

MAX_NEW = 8


def greedy_hf(model, inputs, n_prompt):
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, n_prompt:].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, ids, strict=False)]
    return ids, logprobs


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("idefics"))
    idefics_fixtures.build_idefics(
        path, **idefics_fixtures.IDEFICS_VARIANTS["vector_i2_resampler_qk_addvocab"]
    )
    idefics_fixtures.make_processor().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "prompt",
    [
        "describe <image> the picture",  # one image
        "<image> red circle </s> <image> blue",  # two images, an end of document between them
    ],
)
def test_idefics_interleaved_prompt_equals_hf_generate(idefics_dir, image_files, prompt):
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    n = prompt.count("<image>")
    images = [Image.open(p).convert("RGB") for p in image_files[:n]]
    # the same prompt as IdeficsProcessor's interleaved list: text, image, text, ...
    pieces = prompt.split("<image>")
    interleaved = [pieces[0]]
    for image, text in zip(images, pieces[1:], strict=True):
        interleaved += [image, text]
    interleaved = [x for x in interleaved if not (isinstance(x, str) and not x.strip())]
    processor = AutoProcessor.from_pretrained(idefics_dir)
    inputs = processor(text=[interleaved], return_tensors="pt")
    model = IdeficsForVisionText2Text.from_pretrained(idefics_dir).eval()
    ids, logprobs = greedy_hf(model, inputs, inputs["input_ids"].shape[1])
    result = predict.predict(idefics_dir, prompt, image_files[:n], max_new_tokens=MAX_NEW)
    assert result["token_ids"] == ids
    np.testing.assert_allclose(result["logprobs"], logprobs, atol=1e-3)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import Blip2Processor, BlipImageProcessor

    path = str(tmp_path_factory.mktemp("blip2"))
    blip2_fixtures.build_blip2(path, text="opt", cross_attention_frequency=1)
    tokenizer = blip2_fixtures.make_tokenizer()
    size = blip2_fixtures.IMAGE_SIZE
    image_processor = BlipImageProcessor(size={"height": size, "width": size})
    Blip2Processor(
        image_processor, tokenizer, num_query_tokens=blip2_fixtures.NUM_QUERY_TOKENS
    ).save_pretrained(path)
    return path


def test_blip2_prompt_equals_hf_generate(blip2_dir, image_files):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    prompt = "question : what is it ? answer :"
    processor = AutoProcessor.from_pretrained(blip2_dir)
    image = Image.open(image_files[1]).convert("RGB")
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    model = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    ids, logprobs = greedy_hf(model, inputs, inputs["input_ids"].shape[1])
    result = predict.predict(blip2_dir, prompt, image_files[1:2], max_new_tokens=MAX_NEW)
    assert result["token_ids"] == ids
    np.testing.assert_allclose(result["logprobs"], logprobs, atol=1e-3)
    with pytest.raises(errors.UsageError, match="exactly one --image"):
        predict.predict(blip2_dir, prompt, image_files[:2], max_new_tokens=2)
