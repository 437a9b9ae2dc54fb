"""OpenAI's chat-completions protocol: a request body parsed and checked into a ``ChatRequest`` (images
decoded), the response objects and chunks, and ``ApiError``, the one error type every bad input becomes
(an HTTP status and OpenAI's error body)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
import time
import uuid
from urllib.parse import unquote, urlparse

from mllm_jax.errors import UsageError

ROLES = ("system", "user", "assistant")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class ApiError(UsageError):
    """A request the server refuses: ``status`` and OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Message:
    role: str
    parts: list  # in order: str (text) or a PIL image


@dataclasses.dataclass
class ChatRequest:
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage counts
    num_beams: int = 1

    @property
    def images(self) -> list:
        return [p for m in self.messages for p in m.parts if not isinstance(p, str)]


def _number(body: dict, name: str, kind, default, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(
            f"'{name}' must be a{'n integer' if kind is int else ' number'}, got {value!r}", param=name
        )
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(f"'{name}' must be in [{low}, {high}], got {value}", param=name)
    return kind(value)


def decode_image(url: str, image_root: str | None):
    """An ``image_url``: a ``data:`` URL of a base64 PNG/JPEG/WebP, or ``file://`` under ``image_root``."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise ApiError("image data URLs must be base64 ('data:image/png;base64,...')", param="image_url")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("image data URL: invalid base64", param="image_url") from None
        source = io.BytesIO(raw)
    elif url.startswith("file://"):
        if not image_root:
            raise ApiError(
                "file:// image URLs are off (start the server with --image_root)", param="image_url"
            )
        root = os.path.realpath(image_root)
        path = os.path.realpath(unquote(urlparse(url).path))
        if os.path.commonpath([root, path]) != root:
            raise ApiError(f"image path {path!r} is outside --image_root", param="image_url")
        if not os.path.isfile(path):
            raise ApiError(f"image file {path!r} not found", param="image_url")
        source = path
    else:
        raise ApiError(
            "image_url must be a data: URL (or file:// under --image_root); no remote fetching",
            param="image_url",
        )
    try:
        with Image.open(source) as im:
            if im.format not in IMAGE_FORMATS:
                raise ApiError(
                    f"image format {im.format} is not one of {', '.join(IMAGE_FORMATS)}", param="image_url"
                )
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ApiError):
            raise
        raise ApiError(f"undecodable image ({type(e).__name__}: {e})", param="image_url") from None


def _message(m, image_root) -> Message:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(f"each message needs a role in {ROLES}", param="messages")
    content = m.get("content")
    if isinstance(content, str):
        return Message(m["role"], [content])
    if not isinstance(content, list):
        raise ApiError("message content must be a string or a list of parts", param="messages")
    parts = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            parts.append(p["text"])
        elif kind == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError("an image_url part needs image_url.url", param="messages")
            parts.append(decode_image(url, image_root))
        else:
            raise ApiError(f"unsupported content part {kind!r} (text and image_url are)", param="messages")
    return Message(m["role"], parts)


def parse_chat(raw: bytes, image_root: str | None = None, max_images: int = 4) -> ChatRequest:
    """The body of ``POST /v1/chat/completions`` -> ``ChatRequest``; anything wrong is an ``ApiError``."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise ApiError("'model' is required", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    if _number(body, "n", int, 1) != 1:
        raise ApiError("only n=1 is supported", param="n")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if (
        not isinstance(stop, (list, tuple))
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > 4
    ):
        raise ApiError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    options = body.get("stream_options") or {}
    request = ChatRequest(
        model=body["model"],
        messages=[_message(m, image_root) for m in messages],
        max_tokens=_number(body, "max_completion_tokens", int, None, 1)
        or _number(body, "max_tokens", int, None, 1),
        temperature=_number(body, "temperature", float, 1.0, 0, 2),
        top_p=_number(body, "top_p", float, 1.0, 0, 1),
        seed=_number(body, "seed", int, None),
        stop=tuple(stop),
        stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )
    if request.top_p == 0:
        raise ApiError("'top_p' must be > 0", param="top_p")
    if len(request.images) > max_images:
        raise ApiError(f"too many images: {len(request.images)} (at most {max_images})", param="messages")
    return request


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, n_tokens: int
) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, n_tokens),
    }


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage_counts=None) -> dict:
    """One server-sent event of a streamed completion (``choices`` empty in the usage-only chunk)."""
    choices = (
        []
        if usage_counts
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    )
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_counts:
        out["usage"] = usage_counts
    return out


def model_list(model_id: str) -> dict:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "mllm_jax"}],
    }
