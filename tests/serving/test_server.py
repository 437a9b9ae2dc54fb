"""`serve` on a tiny HF LLaVA dir with the official `openai` client: greedy answers equal transformers'
greedy `generate` on the chat-template prompt for 8 concurrent requests (4 rows: requests wait for free
rows), streamed deltas concatenate to the same text, and bad input gets a 4xx while the server keeps
serving. The server runs in this process (its HTTP and engine threads)."""

import concurrent.futures
import functools
import http.client
import json
import os

import browser
import hf_fixtures
import openai
import pytest
import torch
from chat_client import BROKEN_IMAGE, client, served, streamed, user

MAX_NEW = 10
# LLaVA-1.5's template as llava-hf ships it, spelled for the tiny word-level tokenizer
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ' : ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image> ' }}{% endif %}"
    "{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT :' }}{% endif %}"
)
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


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny HF LLaVA dir whose processor has a chat template, served on a free port:
    ``(dir, base URL, service)``."""
    from transformers import AutoProcessor

    path = str(tmp_path_factory.mktemp("serve_llava"))
    hf_fixtures.build_llava(path, seed=3)
    processor = AutoProcessor.from_pretrained(path)
    processor.chat_template = TEMPLATE
    processor.save_pretrained(path)
    with served(path, "tiny-llava", max_batch=4, max_new_tokens=MAX_NEW) as (url, service):
        yield path, url, service


def hf_greedy(path, messages, images):
    """transformers' greedy generate on the chat-template prompt: ``(decoded answer, ids)``."""
    processor, model = hf_model(path)
    hf_messages = [
        {
            "role": m["role"],
            "content": [
                {"type": "image"} if p["type"] == "image_url" else {"type": "text", "text": p["text"]}
                for p in m["content"]
            ],
        }
        for m in messages
    ]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    return processor.decode(ids, skip_special_tokens=True), ids


@functools.lru_cache(maxsize=1)
def hf_model(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return AutoProcessor.from_pretrained(path), LlavaForConditionalGeneration.from_pretrained(path).eval()


def test_openai_client_greedy_equals_hf_generate(llava):
    path, url, service = llava
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny-llava"]
    images = [hf_fixtures.random_image(seed, size) for seed, size in enumerate([(20, 24), (32, 16)] * 4)]
    requests = [user(q, im) for q, im in zip(QUESTIONS, images, strict=True)]
    expected = [hf_greedy(path, m, [im]) for m, im in zip(requests, images, strict=True)]

    def ask(messages):
        return c.chat.completions.create(
            model="tiny-llava", messages=messages, temperature=0, max_tokens=MAX_NEW
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, requests))
    for answer, (text, ids) in zip(answers, expected, strict=True):
        assert answer.choices[0].message.content == text
        assert answer.usage.completion_tokens == len(ids)
        assert answer.choices[0].finish_reason == ("stop" if ids[-1] == 2 else "length")
    assert len({a.choices[0].message.content for a in answers}) > 1  # the answers do depend on the input

    # sampled: a seed gives the same answer whatever else decodes beside it
    def sample(seed):
        return (
            c.chat.completions.create(
                model="tiny-llava",
                messages=requests[0],
                temperature=1.5,
                top_p=0.9,
                seed=seed,
                max_tokens=MAX_NEW,
            )
            .choices[0]
            .message.content
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sampled = list(pool.map(sample, [5, 5, 6, 7]))
    assert sampled[0] == sampled[1] == sample(5) and len(set(sampled)) > 1

    # streamed: the deltas concatenate to the same text (a JPEG, a WebP: formats the client may send)
    for fmt in ("JPEG", "WEBP"):
        messages = user(QUESTIONS[0], images[0], fmt=fmt)
        whole = ask(messages).choices[0].message.content
        deltas = streamed(c, "tiny-llava", messages, MAX_NEW)
        assert len(deltas) > 1 and "".join(deltas) == whole


def raw_post(url, body: bytes, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(
        "POST", "/v1/chat/completions", body, {"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_bad_input_gets_4xx_and_the_server_keeps_serving(llava):
    _, url, _ = llava
    c = client(url)
    image = hf_fixtures.random_image(0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-llava", messages=BROKEN_IMAGE, max_tokens=2)
    assert e.value.status_code == 400 and "undecodable image" in e.value.message
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=user("hi", image), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="too many images"):
        c.chat.completions.create(model="tiny-llava", messages=user("hi", *[image] * 5), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model="tiny-llava", messages=user("red " * 300, image), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="file://"):
        c.chat.completions.create(
            model="tiny-llava",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="remote"):
        c.chat.completions.create(
            model="tiny-llava",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )  # fmt: skip
    status, body = raw_post(url, b'{"model": "tiny-llava", "messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    status, body = raw_post(url, b"{}", {"Content-Length": str(21 * 1024 * 1024)})
    assert status == 413 and "over the limit" in body["error"]["message"]
    # and the next request is answered
    answer = c.chat.completions.create(
        model="tiny-llava", messages=user("describe the image .", image), max_tokens=3
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1


@pytest.mark.skipif(browser.CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_chat_page_in_a_headless_browser(llava, tmp_path):
    """The chat page: choose an image, type a question, and the streamed answer appears; it is the
    greedy answer transformers gives (the page asks for temperature 0)."""
    path, url, _ = llava
    image = hf_fixtures.random_image(7, (24, 24))
    image_file = str(tmp_path / "shape.png")
    image.save(image_file)
    question = "what color is the shape ?"
    expected, _ = hf_greedy(path, user(question, image), [image])
    b = browser.Browser()
    try:
        b.open(url + "/")
        assert b.js("document.getElementById('model').textContent") == "tiny-llava"
        b.choose_file("#image", image_file)
        b.wait_for("document.getElementById('preview').style.display === 'block'")
        b.js(f"document.getElementById('question').value = {json.dumps(question)}")
        b.js(f"document.getElementById('max_tokens').value = '{MAX_NEW}'")
        b.js("document.getElementById('send').click()")
        b.wait_for("document.getElementById('answer-1') && document.getElementById('answer-1').dataset.done")
        assert b.js("document.getElementById('answer-1').textContent") == expected
        if os.environ.get("MLLM_JAX_SCREENSHOT"):  # docs/serving.md's picture
            b.screenshot(os.environ["MLLM_JAX_SCREENSHOT"])
    finally:
        b.close()
