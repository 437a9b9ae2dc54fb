"""`serve` on a tiny HF IDEFICS dir (two images in one message) and a tiny BLIP-2 dir, neither with a
chat template (each family's default conversation format), with the official `openai` client: greedy
answers equal transformers' greedy `generate` with the model's own processor, for 8 concurrent
requests; streamed deltas concatenate to the same text; an undecodable image gets a 400 and the next
request is answered."""

import concurrent.futures

import blip2_fixtures
import hf_fixtures
import idefics_fixtures
import openai
import pytest
import torch
from chat_client import BROKEN_IMAGE, client, served, streamed, user

MAX_NEW = 8
QUESTIONS = [
    "what is in this picture ?",
    "describe the image .",
    "what color is the shape ?",
    "how many circle are there ?",
    "where is the star ?",
    "is there a red square ?",
    "what shape is on the left ?",
    "which color is on top ?",
]


def images(n, offset=0):
    return [hf_fixtures.random_image(offset + i, (20, 24) if i % 2 else (16, 16)) for i in range(n)]


def hf_greedy(model, inputs, processor):
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    return processor.tokenizer.decode(ids, skip_special_tokens=True), ids


def check_family(url, model_id, requests, expected):
    """The acceptance checks of one served model: concurrent greedy parity, streaming, a broken image."""
    c = client(url)

    def ask(messages):
        return c.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=MAX_NEW)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(ask, requests))
    for answer, (text, ids) in zip(answers, expected, strict=True):
        assert answer.choices[0].message.content == text
        assert answer.usage.completion_tokens == len(ids)
    assert len({a.choices[0].message.content for a in answers}) > 1
    deltas = streamed(c, model_id, requests[0], MAX_NEW)
    assert len(deltas) > 1 and "".join(deltas) == expected[0][0]
    with pytest.raises(openai.BadRequestError, match="undecodable image"):
        c.chat.completions.create(model=model_id, messages=BROKEN_IMAGE, max_tokens=2)
    assert ask(requests[1]).choices[0].message.content == expected[1][0]


def test_idefics_two_images_per_message(tmp_path):
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    path = str(tmp_path / "idefics")
    idefics_fixtures.build_idefics(
        path, seed=5, **idefics_fixtures.IDEFICS_VARIANTS["vector_i2_resampler_qk_addvocab"]
    )
    idefics_fixtures.make_processor().save_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    model = IdeficsForVisionText2Text.from_pretrained(path).eval()
    requests, expected = [], []
    for i, q in enumerate(QUESTIONS):
        pair = images(2, 2 * i)
        requests.append(user(q, *pair))
        # IDEFICS's default format, "User:<image><image>Q<end_of_utterance>\nAssistant:", as the
        # interleaved list IdeficsProcessor takes
        interleaved = ["User:", pair[0], pair[1], f"{q}<end_of_utterance>\nAssistant:"]
        inputs = processor(text=[interleaved], return_tensors="pt")
        expected.append(hf_greedy(model, inputs, processor))
    with served(path, "tiny-idefics", max_batch=4, max_new_tokens=MAX_NEW) as (url, _):
        check_family(url, "tiny-idefics", requests, expected)


def test_blip2(tmp_path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    path = str(tmp_path / "blip2")
    blip2_fixtures.build_blip2(path, text="opt", cross_attention_frequency=1, seed=6)
    size = blip2_fixtures.IMAGE_SIZE
    Blip2Processor(
        BlipImageProcessor(size={"height": size, "width": size}),
        blip2_fixtures.make_tokenizer(),
        num_query_tokens=blip2_fixtures.NUM_QUERY_TOKENS,
    ).save_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    model = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    requests, expected = [], []
    for i, q in enumerate(QUESTIONS):
        [image] = images(1, 20 + i)
        requests.append(user(q, image))
        # BLIP-2's default format (no placeholder: its query tokens go in front)
        inputs = processor(images=[image], text=f"Question: {q} Answer:", return_tensors="pt")
        expected.append(hf_greedy(model, inputs, processor))
    with served(path, "tiny-blip2", max_batch=4, max_new_tokens=MAX_NEW) as (url, _):
        check_family(url, "tiny-blip2", requests, expected)
        with pytest.raises(openai.BadRequestError, match="exactly one"):
            client(url).chat.completions.create(model="tiny-blip2", messages=user("two ?", *images(2)))
