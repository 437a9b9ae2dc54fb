"""What a user asks of an evaluation beyond the task and its data: batching, decoding, prompt, mesh."""

from __future__ import annotations

import dataclasses

from mllm_jax import sharding
from mllm_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Options:
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the task's default
    prompt: str | None = None  # None: the task's default
    limit: int | None = None  # first N examples (synthetic tasks: N questions or clips)
    mesh: object = None  # a jax Mesh to decode sharded on (parse_mesh), None: one device
    mc: str = "generate"  # multiple-choice tasks: "generate" an answer or pick the best "loglik" option

    def check(self):
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_new_tokens", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.mc not in ("generate", "loglik"):
            raise UsageError(f"--mc must be generate or loglik, got {self.mc!r}")


def parse_mesh(text: str):
    """``--mesh=data=2,fsdp=2,tensor=2`` (config.mesh's axes, one may be -1: the rest) -> a Mesh over
    every device, or None for an empty string."""
    if not text:
        return None
    spec = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
            raise UsageError(
                f"--mesh {text!r}: expected axis=size pairs of {sharding.MESH_AXES}, e.g. data=-1"
            )
        spec[key] = int(value)
    try:
        return sharding.make_mesh(spec)
    except ValueError as e:
        raise UsageError(f"--mesh {text!r}: {e}") from None
