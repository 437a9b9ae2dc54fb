r"""Serve a model over OpenAI's chat-completions API, with a chat page at ``/``.

    python -m mllm_jax.serve --model=PATH [--host=127.0.0.1] [--port=8000] [--max_batch=16] \
        [--max_new_tokens=256] [--max_images=4] [--context=0] [--image_root=DIR] [--model_id=NAME] \
        [--mesh=data=-1,fsdp=1,tensor=1]

PATH is a HF directory or one of our checkpoints / training workdirs, of any family (LLaVA, IDEFICS,
BLIP-2 / InstructBLIP). Concurrent requests decode together (``serving/engine.py``); with ``--mesh`` (the
syntax of ``evaluate --mesh``) the params sit on the mesh in training's layout and the KV cache's rows are
split over its batch axes. Bad flags print one
``error:`` line and exit with code 2; bad requests get a 4xx with OpenAI's error body. See docs/serving.md.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging

from mllm_jax.errors import ConversionError, UsageError
from mllm_jax.evaluation.options import parse_mesh
from mllm_jax.serving.http import make_server
from mllm_jax.serving.service import ServeConfig, Service

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model", None, "HF model directory, mllm_jax checkpoint or training workdir.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default: this machine only).")
    flags.DEFINE_integer("port", 8000, "Port (0: any free port).")
    flags.DEFINE_integer("max_batch", 16, "Requests decoded together (rows of the KV cache).")
    flags.DEFINE_integer("max_new_tokens", 256, "Default and largest max_tokens of a request.")
    flags.DEFINE_integer("max_images", 4, "Images per request.")
    flags.DEFINE_integer("context", 0, "KV-cache positions per request (0: the model's, at most 4096).")
    flags.DEFINE_string("image_root", None, "Allow file:// image URLs under this directory.")
    flags.DEFINE_string("model_id", "", "The model id clients use (default: the directory's name).")
    flags.DEFINE_string(
        "mesh", "", "Decode sharded: e.g. data=-1,fsdp=2,tensor=1 (as evaluate --mesh); empty: one device."
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.model:
        print("error: --model is required", file=sys.stderr)
        sys.exit(2)
    try:
        config = ServeConfig(
            model=FLAGS.model,
            model_id=FLAGS.model_id,
            max_batch=FLAGS.max_batch,
            max_new_tokens=FLAGS.max_new_tokens,
            max_images=FLAGS.max_images,
            context=FLAGS.context,
            image_root=FLAGS.image_root,
            mesh=parse_mesh(FLAGS.mesh),
        )
        service = Service(config)
        server = make_server(service, FLAGS.host, FLAGS.port)
    except (UsageError, ConversionError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    host, port = server.server_address[:2]
    # one line on stdout for whoever started us (scripts and tests read the port from it)
    print(f"serving {service.model_id} on http://{host}:{port}", flush=True)
    logging.info("serving on http://%s:%d", host, port)
    # SIGINT and SIGTERM stop the server, even where the parent left SIGINT ignored (a child inherits
    # SIG_IGN, and Python then installs no KeyboardInterrupt handler: seen under a test runner)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
    # Stopped: exit now. The engine's daemon thread may still be inside an XLA call, and interpreter
    # shutdown could then wait on it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    define_flags()
    app.run(main)
