"""Multi-process runs on this machine, as on a pod: 2 processes x 4 CPU devices form one cluster
(``--distributed=on --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I``) and must
train exactly as 1 process x 8 devices; a SIGTERM to one process stops both at the same step, a SIGKILL
makes the other fail, and reruns resume. Plus the flag checks and a start whose peers never come."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import jobs
import pytest
from commands import free_port, main_cmd, rows, xla_env

from mllm_jax import distributed
from mllm_jax.errors import ConfigError
from mllm_jax.families import store

MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
STEPS = [  # one stage (its evaluation included): each process compiles one train step
    "--config.stage_order=('instruct',)",
    "--config.stages.instruct.steps=12",
    "--config.checkpoint_every=2",
    "--config.tensorboard=True",
]
COMPARED = ("loss", "accuracy", "grad_norm", "target_tokens", "eval/")


class Pair:
    """Both processes of one 2-process run, their stderr in files."""

    def __init__(self, workdir: str, logs, name: str, *flags: str):
        port = free_port()
        self.errs = [logs / f"{name}.{i}.err" for i in range(2)]
        self.procs = []
        for i in range(2):
            cluster = ["--distributed=on", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
            cmd = main_cmd(workdir, *MESH, *STEPS, *flags, *cluster, f"--process_id={i}")
            with open(self.errs[i], "w") as err:
                self.procs.append(jobs.popen(cmd, env=xla_env(4), stdout=subprocess.DEVNULL, stderr=err))

    def wait(self, timeout=900) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [p.returncode for p in self.procs]

    def stderr(self, i: int) -> str:
        return self.errs[i].read_text()

    def summary(self) -> str:
        """Exit codes and each process's log without the native stack frames (they hide the cause)."""
        logs = []
        for i, p in enumerate(self.procs):
            lines = [x for x in self.stderr(i).splitlines() if not x.lstrip().startswith("@ ")]
            logs.append(f"process {i} exit {p.poll()}:\n" + "\n".join(lines[-25:]))
        return "\n".join(logs)

    def signal_when(self, i: int, condition, sig, timeout=900) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"a process ended early: {self.summary()}")
            if condition():
                self.procs[i].send_signal(sig)
                return time.time()
            time.sleep(0.01)
        raise AssertionError("timed out waiting to send the signal")


@jobs.fixture
def one_process(tmp):
    """The reference: 1 process x 8 devices, straight through."""
    workdir = str(tmp / "one")
    jobs.check(jobs.run(main_cmd(workdir, *MESH, *STEPS), env=xla_env(8), timeout=900))
    return rows(workdir)


@jobs.fixture
def two_processes(tmp):
    """The same run as 2 processes x 4 devices: SIGKILL to process 1 after the first checkpoint, then
    the command again with SIGTERM to process 1 after two more steps, then again to the end."""
    workdir = str(tmp / "two")
    seen = {}
    run = Pair(workdir, tmp, "killed")
    run.signal_when(
        1, lambda: (store.latest_step(workdir) or 0) >= 2 and len(rows(workdir)) >= 3, signal.SIGKILL
    )
    killed_at = time.time()
    codes = run.wait()
    seen["killed"] = (codes, time.time() - killed_at, store.latest_step(workdir), run.stderr(0))
    run = Pair(workdir, tmp, "stopped")
    resumed = seen["killed"][2]
    run.signal_when(1, lambda: max([r["step"] for r in rows(workdir)] or [0]) >= resumed + 2, signal.SIGTERM)
    seen["stopped"] = (run.wait(), run.stderr(0), run.stderr(1), store.latest_step(workdir))
    run = Pair(workdir, tmp, "end")
    seen["end"] = (run.wait(), run.stderr(0))
    seen["rows"] = rows(workdir)
    seen["tensorboard"] = os.listdir(os.path.join(workdir, "tensorboard"))
    return seen


def test_two_processes_train_as_one_and_survive_sigkill_and_sigterm(one_process, two_processes):
    seen = two_processes
    # SIGKILL of one process: the other fails within 2 minutes; a complete checkpoint stays
    codes, seconds, step, _ = seen["killed"]
    assert codes[1] == -signal.SIGKILL and codes[0] != 0 and seconds < 120, (codes, seconds)
    assert step is not None and step >= 2
    # SIGTERM to process 1 alone: both save the same step and exit 143
    codes, err0, err1, saved = seen["stopped"]
    assert codes == [143, 143], (codes, err0[-2000:])
    stops = [re.findall(r"stopped by SIGTERM at step (\d+)", err) for err in (err0, err1)]
    assert stops[0] == stops[1] == [str(saved)], stops
    assert f"resuming from step {step} " in err0
    # the rerun ends with the losses and evaluation of one process x 8 devices
    codes, err = seen["end"]
    assert codes == [0, 0], err[-3000:]
    ours, reference = seen["rows"], one_process
    assert [r["step"] for r in ours] == [r["step"] for r in reference]  # each row written once
    for a, b in zip(ours, reference, strict=True):
        for key in b:
            if key.startswith(COMPARED) and not key.endswith("_per_sec"):  # rates are timings
                assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    evaluated = [(r["step"], r["eval/vqa_accuracy"]) for r in ours if "eval/vqa_accuracy" in r]
    assert evaluated and evaluated == [
        (r["step"], r["eval/vqa_accuracy"]) for r in reference if "eval/vqa_accuracy" in r
    ]
    assert len(seen["tensorboard"]) == 3  # one events file per run that trained: process 0 alone writes


# ---------------------------------------------------------------- starting a cluster


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator_address="h:1", num_processes=2, process_id=0), "need --distributed=on"),
        (dict(mode="on", coordinator_address="h:1", num_processes=2), "go together"),
        (dict(mode="on", coordinator_address="h", num_processes=2, process_id=0), "must be HOST:PORT"),
        (dict(mode="on", coordinator_address="h:1", num_processes=2, process_id=2), r"must be in 0\.\.1"),
        (dict(mode="on", timeout_s=0), "must be positive"),
    ],
)
def test_cluster_flags_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        distributed.start(distributed.Cluster(**kwargs))


def test_auto_joins_only_where_the_environment_names_a_cluster(monkeypatch):
    for key in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.Cluster().wanted() and not distributed.Cluster(mode="off").wanted()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert distributed.Cluster().wanted() and not distributed.Cluster(mode="off").wanted()
    assert distributed.start(distributed.Cluster(mode="off")) is False


@jobs.fixture
def lonely(tmp):
    """Process 0 of 2, whose peer never starts, with a 3 s timeout."""
    flags = ["--distributed=on", f"--coordinator_address=127.0.0.1:{free_port()}"]
    flags += ["--num_processes=2", "--process_id=0", "--distributed_timeout=3"]
    t0 = time.time()
    r = jobs.run(main_cmd(str(tmp / "w"), *flags), env=xla_env(4), timeout=120)
    return r, time.time() - t0


def test_a_process_whose_peers_never_come_fails_in_one_line(lonely):
    r, seconds = lonely
    assert r.returncode == 1 and seconds < 60, (r.returncode, seconds)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "not every process joined the cluster at 127.0.0.1:" in errors[0] and "within 3 s" in errors[0]
