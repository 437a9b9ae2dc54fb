"""Where training reports go: ``metrics.jsonl`` (one JSON object per row), TensorBoard events, and a
progress line with ETA on stderr."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import logging

from mllm_jax import paths


class MetricsWriter:
    """Appends to a local ``metrics.jsonl``; in a bucket (no appends there) rewrites the whole object
    with each row, so a reader always sees complete rows."""

    def __init__(self, workdir: str, enable_tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled  # on multi-host runs only process 0 writes
        if not enabled:
            return
        self._path = paths.join(workdir, "metrics.jsonl")
        self._jsonl, self._rows = None, None
        if paths.is_remote(workdir):
            self._rows = paths.read_text(self._path).splitlines(True) if paths.exists(self._path) else []
        else:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(self._path, "a")  # noqa: SIM115 - lives with the run
        self._tb = None
        if enable_tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

    def write(self, step: int, row: dict):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        line = json.dumps(row) + "\n"
        if self._jsonl is None:
            self._rows.append(line)
            paths.write_text(self._path, "".join(self._rows))
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self):
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(workdir: str, last_step: int):
    """Drop rows after ``last_step`` (a resumed run recomputes them), so the file reads as one run."""
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.exists(path):
        return
    lines = paths.read_text(path).splitlines(True)
    rows = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    paths.write_text(path, "".join(rows))


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


class Progress:
    """``[align] 120/500 24% | loss 2.310 | 14.2 steps/s | ETA 0:27`` on stderr (a log line off a tty)."""

    def __init__(self, stage: str, start: int, total: int):
        self.stage, self.start, self.total = stage, start, total
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float):
        done = step - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        line = (
            f"[{self.stage}] {step}/{self.total} {100 * step / max(self.total, 1):3.0f}% | loss {loss:.3f} | "
            f"{rate:.1f} steps/s | ETA {eta_s}"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            logging.info(line)

    def close(self):
        if self.tty:
            print(file=sys.stderr)
