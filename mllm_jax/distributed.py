"""Joining a multi-process JAX cluster: the flags ``main`` and ``evaluate`` share, and a start that
fails in one line (not a hang, not a C++ abort) when the peers never arrive.

``--distributed=auto`` (default) joins when the environment says this is one host of many: a
multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES``), Slurm (``SLURM_NTASKS`` > 1) or an explicit
``JAX_COORDINATOR_ADDRESS``; JAX then detects the process count and id itself. ``--distributed=on``
always joins; with ``--coordinator_address``, ``--num_processes`` and ``--process_id`` it joins any
cluster (GPU VMs, plain CPU machines, several processes on one laptop), else it relies on the same
detection. Every process runs the same command (but its own ``--process_id``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from mllm_jax.errors import ConfigError

DEFAULT_TIMEOUT_S = 300  # peers must all arrive within this; JAX's own default
DEFAULT_HEARTBEAT_S = 60  # a dead peer makes the others fail after about this long


def define_flags():
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "on", "off"],
        "Join a multi-process JAX cluster before anything else: 'auto' joins on multi-host TPU slices "
        "(TPU_WORKER_HOSTNAMES lists several hosts), under Slurm, or when JAX_COORDINATOR_ADDRESS is set.",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0's coordinator (every process passes the same)."
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the cluster (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
    flags.DEFINE_integer(
        "distributed_timeout",
        DEFAULT_TIMEOUT_S,
        "Seconds to wait for every process to join; then fail with one line.",
    )


@dataclasses.dataclass(frozen=True)
class Cluster:
    mode: str = "auto"  # auto | on | off
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S
    heartbeat_s: int = DEFAULT_HEARTBEAT_S

    @classmethod
    def from_flags(cls) -> Cluster:
        f = flags.FLAGS
        return cls(f.distributed, f.coordinator_address, f.num_processes, f.process_id, f.distributed_timeout)

    def check(self):
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in explicit):
            if self.mode != "on":
                raise ConfigError("--coordinator_address/--num_processes/--process_id need --distributed=on")
            if any(v is None for v in explicit):
                raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
            if ":" not in self.coordinator_address:
                raise ConfigError(f"--coordinator_address={self.coordinator_address!r} must be HOST:PORT")
            if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
                raise ConfigError(
                    f"--process_id={self.process_id} must be in 0..{self.num_processes - 1} "
                    f"(--num_processes={self.num_processes})"
                )
        if self.timeout_s < 1:
            raise ConfigError(f"--distributed_timeout={self.timeout_s} must be positive")

    def wanted(self) -> bool:
        return self.mode == "on" or (self.mode == "auto" and detected())


def detected() -> bool:
    """Whether the environment names a multi-process cluster that JAX can join with no arguments."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    return len(hosts) > 1 or slurm or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def start(cluster: Cluster) -> bool:
    """Join the cluster if ``cluster`` asks for one; whether it did. Call before any other JAX use.

    A process whose peers do not all arrive within ``timeout_s`` exits with code 1 and one line on
    stderr (JAX itself would abort with a C++ stack trace, or wait forever for an unreachable
    coordinator)."""
    cluster.check()
    if not cluster.wanted():
        return False
    who = "" if cluster.process_id is None else f"process {cluster.process_id}: "
    done = threading.Event()

    def give_up():
        if not done.wait(cluster.timeout_s):
            where = cluster.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "auto-detected")
            print(
                f"error: {who}not every process joined the cluster at {where} within "
                f"{cluster.timeout_s} s (--distributed_timeout); is every process started, with the same "
                "--coordinator_address?",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)

    threading.Thread(target=give_up, daemon=True, name="distributed-timeout").start()
    try:
        jax.distributed.initialize(
            cluster.coordinator_address,
            cluster.num_processes,
            cluster.process_id,
            # JAX's own timeout fires later than ours: ours is the one-line message
            initialization_timeout=cluster.timeout_s + 30,
            heartbeat_timeout_seconds=cluster.heartbeat_s,
        )
    except (RuntimeError, ValueError) as e:  # e.g. "Number of processes must be defined" off a pod
        done.set()
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise ConfigError(
            f"could not join a JAX cluster ({lines[0] if lines else type(e).__name__}); pass "
            "--coordinator_address, --num_processes and --process_id"
        ) from e
    done.set()
    return True


def gather_json(value) -> list:
    """Every process's JSON-able ``value``, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(rows, sizes, strict=True)]


class StopAgreement:
    """Whether every process should stop (save and exit) at this step, the same answer on all of them.

    One process: our SIGTERM handler's flag. Several: JAX's preemption sync point, which the
    coordination service sets for all processes once any of them gets SIGTERM (its own handler, so
    ours is not installed), at a step every process has yet to reach."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.requested = False  # single process: set by the handler; several: latched at the sync point

    def install(self):
        """Install the SIGTERM handler (single process); returns a function that restores the old one."""
        if self.multi:
            return lambda: None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM: saving at the next step boundary")
        self.requested = True

    def at_step(self, global_step: int) -> bool:
        """Call once per step, with increasing steps, on every process."""
        if self.multi and not self.requested:
            self.requested = multihost_utils.reached_preemption_sync_point(global_step)
            if self.requested:
                logging.warning("preemption notice: every process saves at step %d", global_step)
        return self.requested
