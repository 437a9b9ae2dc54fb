"""Continuous batching: concurrent requests decode together in the rows of one KV cache
(``inference.steps.Rows``), one compiled fixed-shape step for all rows.

One thread owns the device. Between steps it admits waiting requests into free rows (a prefill each,
compiled once per prompt bucket and image count), then runs one step over every row and hands each
active request its token; a finished request frees its row for the next one at once. Each request's
text is detokenized here and handed out as deltas on its own queue: what a streaming client receives
concatenates to what a non-streaming one gets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time

import numpy as np
from absl import logging

from mllm_jax.inference import steps


@dataclasses.dataclass(eq=False)
class Job:
    """One request in the engine: inputs, settings, and the queue its events go to: ``("delta", text)``
    then ``("done", finish_reason, prompt_tokens, completion_tokens)`` or ``("error", message)``."""

    tokens: list[int]
    pixels: np.ndarray | None
    embed_kwargs: dict
    model: object  # the module for this request's config
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    ids: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""
    cancelled: bool = False


class Engine:
    def __init__(self, rows: steps.Rows, tokenizer, eos_ids, context=contextlib.nullcontext):
        """``context``: entered by the device thread around its work (a mesh's sharding context, under
        which the steps are traced)."""
        self.rows, self.tokenizer, self._context = rows, tokenizer, context
        self.eos = set(eos_ids)
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.active: dict[int, Job] = {}
        n = rows.rows
        self.next_token, self.index = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.temperature, self.top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        self.seed, self.count = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    @property
    def context(self) -> int:
        return self.rows.length

    def start(self):
        self._thread.start()
        return self

    def close(self):
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        self.waiting.put(job)
        return job

    # -- the device thread

    def _loop(self):
        with self._context():
            while not self._stop.is_set():
                try:
                    self._admit()
                    if not self.active:
                        continue
                    self._step()
                except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                    logging.exception("engine step failed")
                    for row, job in list(self.active.items()):
                        job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                        del self.active[row]

    def _admit(self):
        free = [r for r in range(self.rows.rows) if r not in self.active]
        while free:
            try:  # block only while nothing is decoding
                job = self.waiting.get(timeout=0.05) if not self.active else self.waiting.get_nowait()
            except queue.Empty:
                return
            if job.cancelled:
                continue
            row = free.pop(0)
            try:
                logits_V = self.rows.prefill(row, job.tokens, job.pixels, job.embed_kwargs, job.model)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                logging.exception("prefill failed")
                job.events.put(("error", f"prefill failed: {type(e).__name__}: {e}"))
                free.insert(0, row)
                continue
            self.stats["prefills"] += 1
            self.temperature[row], self.top_p[row] = job.temperature, job.top_p
            self.seed[row], self.count[row] = job.seed, 0
            self.index[row] = len(job.tokens)
            # the first token comes from the prefill's logits, chosen as the steps choose
            token, _ = steps.choose_one(
                logits_V[None], self.temperature[row : row + 1], self.top_p[row : row + 1],
                self.seed[row : row + 1], self.count[row : row + 1],
            )  # fmt: skip
            self.active[row] = job
            self._emit(row, int(np.asarray(token)[0]))

    def _step(self):
        token_B, _ = self.rows.sample(
            self.next_token, self.index, self.temperature, self.top_p, self.seed, self.count
        )
        token_B = np.asarray(token_B)
        self.stats["steps"] += 1
        for row in list(self.active):
            self.index[row] += 1
            self._emit(row, int(token_B[row]))

    def _emit(self, row: int, token: int):
        """Record ``row``'s new token, hand out the text it adds, and free the row when it is done."""
        job = self.active[row]
        self.stats["tokens"] += 1
        job.ids.append(token)
        self.next_token[row], self.count[row] = token, len(job.ids)
        text = self.tokenizer.decode(job.ids, skip_special_tokens=True)
        finish = None
        if token in self.eos:
            finish = "stop"
        for s in job.stop:
            at = text.find(s)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and (len(job.ids) >= job.max_tokens or self.index[row] + 1 >= self.context):
            finish = "length"
        if job.cancelled:
            finish = "cancelled"
        # while running, hold back what could still turn out to start a stop string
        ready = text if finish else text[: len(text) - max((len(s) - 1 for s in job.stop), default=0)]
        if ready.endswith("\ufffd") and not finish:  # half a multi-byte character
            ready = ready[:-1]
        if ready.startswith(job.sent) and len(ready) > len(job.sent):
            job.events.put(("delta", ready[len(job.sent) :]))
            job.sent = ready
        if finish:
            del self.active[row]
            job.events.put(("done", finish, len(job.tokens), len(job.ids)))

    # -- callers' side

    def results(self, job: Job, timeout: float = 600.0):
        """Yield ``job``'s events until it is done (``("error", message)`` included)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = job.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                job.cancelled = True
                yield ("error", "generation timed out")
                return
            yield event
            if event[0] != "delta":
                return
