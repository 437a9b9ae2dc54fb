"""A loaded model behind the engine: a chat request -> the prompt (chat template), the family's
processor inputs, checks against the context, and a ``Job`` the engine decodes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import families, sharding
from mllm_jax.families import base, store
from mllm_jax.inference import steps
from mllm_jax.inference.generate import PROMPT_BUCKET, llm_config, place_params
from mllm_jax.inference.inputs import eos_token_ids, prepare_inputs
from mllm_jax.serving import prompts
from mllm_jax.serving.engine import Engine, Job
from mllm_jax.serving.protocol import ApiError, ChatRequest


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: str  # HF dir, our checkpoint, or a training workdir
    model_id: str = ""  # the id clients name ('model'); default: the directory's name
    max_batch: int = 16  # rows decoded together
    max_new_tokens: int = 256  # the default (and largest) max_tokens of a request
    max_images: int = 4  # images per request
    context: int = 0  # KV-cache positions per row; 0: the model's (at most 4096)
    image_root: str | None = None  # file:// image URLs are allowed under this directory only
    max_body_bytes: int = 20 * 1024 * 1024
    mesh: object = None  # a jax Mesh (serve --mesh): params and KV cache on it; None: one device

    def validate(self):
        for name in ("max_batch", "max_new_tokens", "max_images"):
            if getattr(self, name) < 1:
                raise ApiError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.image_root and not os.path.isdir(self.image_root):
            raise ApiError(f"--image_root {self.image_root!r}: no such directory")


class Service:
    def __init__(self, config: ServeConfig):
        config.validate()
        self.config = config
        self.pretrained, self.assets = store.load_any(config.model)
        self.model_id = config.model_id or os.path.basename(os.path.normpath(config.model))
        p = self.pretrained
        model = self.module(p.config)
        positions = llm_config(model).max_positions
        length = min(config.context or min(positions, 4096), positions)
        length -= length % PROMPT_BUCKET  # a bucketed prompt always fits the row
        if length < PROMPT_BUCKET:
            raise ApiError(f"a context of {length} positions is too short (>= {PROMPT_BUCKET})")
        self.template_owner = prompts.chat_template_owner(self.assets)
        params, context = p.params, contextlib.nullcontext
        if config.mesh is not None:  # training's layout of the params; the steps traced under the mesh
            params = place_params(model, params, config.mesh)
            context = functools.partial(sharding.activation_context, config.mesh, sharding.rules())
        rows = steps.Rows(model, params, config.max_batch, length, config.max_images)
        if config.mesh is not None:
            _place_rows(rows, config.mesh)
            _log_placement(params, config.mesh)
        self._tokenizer = None
        self._lock = threading.Lock()  # HF processors are not known to be thread-safe
        tokenizer = self._probe_tokenizer()
        self.eos = tokenizer.eos_token or "</s>"
        eos_ids = eos_token_ids(self.assets, p.hf_config, tokenizer)
        self.engine = Engine(rows, tokenizer, eos_ids, context).start()
        logging.info(
            "serving %s (%s) as %r: %d rows x %d positions", config.model, p.family, self.model_id,
            config.max_batch, length,
        )  # fmt: skip

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one per config (IDEFICS' ids); the service lives as long
    def module(self, config):
        return families.build(self.pretrained.family, config)

    def _probe_tokenizer(self):
        owner = self.template_owner
        if owner is not None:
            return getattr(owner, "tokenizer", owner)
        try:
            processor = base.load_processor(self.assets)
            return getattr(processor, "tokenizer", processor)
        except Exception:  # noqa: BLE001 - no processor saved: the tokenizer alone
            return base.load_tokenizer(self.assets)

    def job(self, request: ChatRequest) -> Job:
        """The engine job of ``request``; bad requests raise ``ApiError``."""
        if request.model != self.model_id:
            raise ApiError(
                f"the model {request.model!r} does not exist (this server has {self.model_id!r})",
                status=404, param="model", code="model_not_found",
            )  # fmt: skip
        prompt, images = prompts.render(request.messages, self.template_owner, self.pretrained, self.eos)
        p = self.pretrained
        with self._lock:
            try:
                inputs = prepare_inputs(p.family, p.config, self.assets, prompt, images)
            except ValueError as e:  # the family's own checks (image count, placeholders)
                raise ApiError(str(e), param="messages") from None
        room = self.engine.context - len(inputs.tokens)
        if room < 1:
            raise ApiError(
                f"the prompt is {len(inputs.tokens)} tokens; this model's context is {self.engine.context}",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip
        max_tokens = request.max_tokens or min(self.config.max_new_tokens, room)
        if max_tokens > room:
            raise ApiError(
                f"max_tokens {max_tokens} + the prompt's {len(inputs.tokens)} tokens exceed the context "
                f"of {self.engine.context}", param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        return Job(
            tokens=inputs.tokens,
            pixels=inputs.pixels,
            embed_kwargs=inputs.embed_kwargs,
            model=self.module(inputs.config or p.config),
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed if request.seed is not None else int.from_bytes(os.urandom(3), "little"),
            stop=request.stop,
        )

    def close(self):
        self.engine.close()


def _place_rows(rows: steps.Rows, mesh) -> None:
    """The KV cache (and Flamingo's media) with their rows split over the mesh's batch axes, as
    ``generate`` splits a batch (replicated when the rows do not divide over them)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x, axis: int):
        spec = [None] * x.ndim
        if x.shape[axis] % shards == 0:
            spec[axis] = ("data", "fsdp")
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    rows.cache = jax.tree.map(lambda x: put(x, 1 if rows.stacked else 0), rows.cache)
    if rows.media is not None:
        rows.media, rows.media_mask = put(rows.media, 0), put(rows.media_mask, 0)


def _log_placement(params, mesh) -> None:
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    device = mesh.devices.flat[0]
    mine = sum(
        int(np.prod(s.data.shape)) * s.data.dtype.itemsize
        for x in jax.tree.leaves(params)
        for s in x.addressable_shards
        if s.device == device
    )
    logging.info("params on mesh %s: %d of %d bytes on %s", dict(mesh.shape), mine, total, device)
