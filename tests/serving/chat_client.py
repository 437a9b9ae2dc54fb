"""What the serving tests share: an in-process server on a free port, OpenAI-format messages with
images as data: URLs, and the client calls."""

from __future__ import annotations

import base64
import contextlib
import io

import openai

from mllm_jax.serving.http import make_server, serve_in_background
from mllm_jax.serving.service import ServeConfig, Service


@contextlib.contextmanager
def served(path: str, model_id: str, **config):
    """``serve`` on ``path`` in this process (HTTP and engine threads): yields ``(base URL, service)``."""
    service = Service(ServeConfig(model=path, model_id=model_id, **config))
    server = make_server(service, "127.0.0.1", 0)
    serve_in_background(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", service
    finally:
        server.shutdown()
        server.server_close()
        service.close()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, *images, fmt="PNG"):
    """One user message: the images (in order), then the text."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(im, fmt)}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"no png").decode()
BROKEN_IMAGE = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": NOT_AN_IMAGE}},
            {"type": "text", "text": "what is it ?"},
        ],
    }
]


def streamed(c: openai.OpenAI, model: str, messages, max_tokens: int) -> list[str]:
    """The content deltas of a streamed greedy completion."""
    stream = c.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True
    )
    return [x.choices[0].delta.content for x in stream if x.choices and x.choices[0].delta.content]
