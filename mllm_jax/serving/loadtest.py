"""Aggregate decoding throughput of a running server at a given concurrency: ``clients`` threads, each
sending chat requests back to back (stdlib HTTP, no client library), tokens counted from ``usage``.
docs/benchmarks.md's serving figures come from ``measure`` (the command is in docs/serving.md)."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import time
from urllib.parse import urlparse

import numpy as np


def image_url(seed: int, size=(32, 32)) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(url: str, body: dict) -> dict:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {out}")
    return out


def measure(
    url: str, model: str, clients: int, requests_per_client: int, max_tokens: int, question: str
) -> dict:
    """``{"clients", "requests", "tokens", "seconds", "tokens_per_s"}`` of one run (greedy requests,
    one image each)."""

    def body(i):
        content = [
            {"type": "image_url", "image_url": {"url": image_url(i)}},
            {"type": "text", "text": question},
        ]
        return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": max_tokens}  # fmt: skip

    # the bodies are made before the clock starts: the client's own work is not the server's time
    bodies = [[body(k * 1000 + r) for r in range(requests_per_client)] for k in range(clients)]

    def client(k):
        return sum(chat(url, b)["usage"]["completion_tokens"] for b in bodies[k])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": clients * requests_per_client,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
    }
