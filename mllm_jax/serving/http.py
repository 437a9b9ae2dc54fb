"""The HTTP server (stdlib, one thread per connection; the engine thread does the decoding):

    GET  /                      the chat page (static/chat.html)
    GET  /health                {"status": "ok"}
    GET  /v1/models             the one model served
    POST /v1/chat/completions   OpenAI's chat completions, streamed as server-sent events with "stream"

Every refused request gets a 4xx and OpenAI's error body; the server keeps serving.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from absl import logging

from mllm_jax.serving import protocol
from mllm_jax.serving.protocol import ApiError
from mllm_jax.serving.service import Service


class Handler(BaseHTTPRequestHandler):
    service: Service  # set on the subclass make_server builds
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        logging.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict):
        self._send(status, json.dumps(obj).encode())

    def _error(self, e: ApiError):
        self._json(e.status, e.body())

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._json(200, protocol.model_list(self.service.model_id))
        elif path in ("/", "/index.html"):
            page = resources.files("mllm_jax.serving").joinpath("static/chat.html").read_bytes()
            self._send(
                200, page.replace(b"{{MODEL_ID}}", self.service.model_id.encode()), "text/html; charset=utf-8"
            )
        else:
            self._error(ApiError(f"no route {path!r}", status=404))

    def do_POST(self):  # noqa: N802
        if self.path.split("?")[0] != "/v1/chat/completions":
            self.close_connection = True
            return self._error(ApiError(f"no route {self.path!r}", status=404))
        try:
            size = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            return self._error(ApiError("a Content-Length header is required", status=411))
        limit = self.service.config.max_body_bytes
        if size > limit:
            self.close_connection = True  # the unread body must not be taken for the next request
            return self._error(ApiError(f"the body is {size} bytes, over the limit of {limit}", status=413))
        raw = self.rfile.read(size)
        try:
            request = protocol.parse_chat(raw, self.service.config.image_root, self.service.config.max_images)
            job = self.service.job(request)
        except ApiError as e:
            return self._error(e)
        self.service.engine.submit(job)
        cid = protocol.completion_id()
        if request.stream:
            self._stream(request, job, cid)
        else:
            self._complete(request, job, cid)

    def _complete(self, request, job, cid):
        text = []
        for event in self.service.engine.results(job):
            if event[0] == "delta":
                text.append(event[1])
            elif event[0] == "error":
                return self._json(500, ApiError(event[1], status=500).body())
            else:
                _, finish, n_prompt, n_out = event
        self._json(200, protocol.completion(cid, request.model, "".join(text), finish, n_prompt, n_out))

    def _stream(self, request, job, cid):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            send(protocol.chunk(cid, request.model, {"role": "assistant", "content": ""}))
            for event in self.service.engine.results(job):
                if event[0] == "delta":
                    send(protocol.chunk(cid, request.model, {"content": event[1]}))
                elif event[0] == "error":
                    send(ApiError(event[1], status=500).body())
                else:
                    _, finish, n_prompt, n_out = event
                    send(protocol.chunk(cid, request.model, {}, finish))
                    if request.include_usage:
                        send(
                            protocol.chunk(
                                cid, request.model, {}, usage_counts=protocol.usage(n_prompt, n_out)
                            )
                        )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop decoding for it
            job.cancelled = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: a burst of clients must not be reset (default 5)


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000) -> Server:
    """The server, bound (``port=0``: any free port, ``server.server_address`` says which), not started."""
    handler = type("BoundHandler", (Handler,), {"service": service})
    return Server((host, port), handler)


def serve_in_background(server: Server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread
