"""`serve` on a tiny HF LLaVA dir with the official `openai` client: greedy answers equal transformers'
greedy `generate` on the chat-template prompt for 8 concurrent requests (4 rows: requests wait for free
rows), streamed deltas concatenate to the same text, and bad input gets a 4xx while the server keeps
serving. The server runs in this process (its HTTP and engine threads)."""

import base64
import concurrent.futures
import http.client
import io
import json

import hf_fixtures
import openai
import pytest
import torch
from PIL import Image

from mllm_jax.serving.http import make_server, serve_in_background
from mllm_jax.serving.service import ServeConfig, Service

MAX_NEW = 10
# LLaVA-1.5's template as llava-hf ships it, spelled for the tiny word-level tokenizer
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ' : ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image> ' }}{% endif %}{% endfor %}"
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


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, *images, fmt="PNG"):
    parts = [{"type": "image_url", "image_url": {"url": data_url(im, fmt)}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


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
    service = Service(ServeConfig(model=path, model_id="tiny-llava", max_batch=4, max_new_tokens=MAX_NEW))
    server = make_server(service, "127.0.0.1", 0)
    serve_in_background(server)
    yield path, f"http://127.0.0.1:{server.server_address[1]}", service
    server.shutdown()
    service.close()


def hf_greedy(path, messages, images):
    """transformers' greedy generate on the chat-template prompt: the decoded answer."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
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
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    return processor.decode(ids, skip_special_tokens=True), ids


def test_openai_client_greedy_equals_hf_generate(llava):
    path, url, service = llava
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    images = [hf_fixtures.random_image(seed, size) for seed, size in enumerate([(20, 24), (32, 16)] * 4)]
    requests = [user(q, im) for q, im in zip(QUESTIONS, images, strict=True)]
    expected = [hf_greedy(path, m, [im]) for m, im in zip(requests, images, strict=True)]

    def ask(messages):
        return client.chat.completions.create(
            model="tiny-llava", messages=messages, temperature=0, max_tokens=MAX_NEW
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, requests))
    for answer, (text, ids) in zip(answers, expected, strict=True):
        assert answer.choices[0].message.content == text
        assert answer.usage.completion_tokens == len(ids)
        assert answer.choices[0].finish_reason == ("stop" if ids[-1] == 2 else "length")
    assert len({a.choices[0].message.content for a in answers}) > 1  # the answers do depend on the input

    # streamed: the deltas concatenate to the same text (a JPEG, a WebP: formats the client may send)
    for fmt in ("JPEG", "WEBP"):
        messages = user(QUESTIONS[0], images[0], fmt=fmt)
        whole = ask(messages).choices[0].message.content
        stream = client.chat.completions.create(
            model="tiny-llava", messages=messages, temperature=0, max_tokens=MAX_NEW, stream=True
        )
        deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
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
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    image = hf_fixtures.random_image(0)
    broken = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}},
                {"type": "text", "text": "what is it ?"},
            ],
        }
    ]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llava", messages=broken, max_tokens=2)
    assert e.value.status_code == 400 and "undecodable image" in e.value.message
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=user("hi", image), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="too many images"):
        client.chat.completions.create(model="tiny-llava", messages=user("hi", *[image] * 5), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny-llava", messages=user("red " * 300, image), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="file://"):
        client.chat.completions.create(
            model="tiny-llava",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="remote"):
        client.chat.completions.create(
            model="tiny-llava",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )  # fmt: skip
    status, body = raw_post(url, b'{"model": "tiny-llava", "messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    status, body = raw_post(url, b"{}", {"Content-Length": str(21 * 1024 * 1024)})
    assert status == 413 and "over the limit" in body["error"]["message"]
    # and the next request is answered
    answer = client.chat.completions.create(
        model="tiny-llava", messages=user("describe the image .", image), max_tokens=3
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
