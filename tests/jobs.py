"""Background jobs: the slow fixtures that only wait on commands run next to the other tests.

Most of the suite keeps one core busy: pytest runs one test at a time, and a test that runs a command
(a training run through ``python -m mllm_jax.main``, a multi-device subprocess, a plan) waits for it.
A fixture defined with ``@jobs.fixture`` is instead a job: a function of a fresh directory that runs
its commands in a thread of pytest's process and returns what the tests need (a workdir, parsed
output). When the session has collected its tests, conftest.py starts the jobs the selected tests use,
in the order the tests come, at most ``SLOTS`` at a time, while pytest runs the tests before them;
a test then gets its job's result (waiting if it is still running, and starting it if it had not).

A job's function must not use JAX or torch in pytest's process (that would compete with the test
running there): it runs commands, reads and writes files, and may wait on other jobs. Its exceptions
are raised again in every test that uses it, as a failing fixture's are.

``run``, ``python`` and ``popen`` start the commands (in jobs and in tests alike): a ``python`` command
is a fork of tests/zygote.py's server, which has already imported JAX, torch, transformers and the
library (a command then costs ~0.1 s of start-up instead of ~3.5 s), unless ``fresh=True``.

``MLLM_JAX_TEST_JOBS=N`` sets ``SLOTS`` (0: nothing starts early, each job runs when a test first
needs it, as a plain fixture would); ``MLLM_JAX_TEST_ZYGOTE=0`` runs every command in its own
interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One job next to pytest's own process on two cores; more on bigger machines.
SLOTS = int(os.environ.get("MLLM_JAX_TEST_JOBS", max(1, (os.cpu_count() or 1) - 1)))

_lock = threading.Condition()
_jobs: dict[str, Job] = {}  # fixture name -> job
_queue: list[Job] = []
_waiting = 0  # pytest's threads blocked in Job.result(): each lets one more job run meanwhile
_current = threading.local()  # .job: the job a thread runs
_tmp_root: str | None = None
_closing = False  # the session is over: no more commands


class Job:
    def __init__(self, name: str, fn: Callable[[Path], object]):
        self.name, self.fn = name, fn
        self.started = self.done = False
        self.blocked = 0  # waiting for other jobs: not counted as running
        self.value = self.error = None
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # of the commands it forked from tests/zygote.py's server

    def _run(self):
        _current.job = self
        t0 = time.time()
        try:
            self.value = self.fn(Path(tempfile.mkdtemp(prefix=f"{self.name}_", dir=_tmp_dir())))
        except BaseException as e:  # noqa: BLE001 - re-raised in the tests that use the job
            self.error = e
        self.seconds = time.time() - t0
        with _lock:
            self.done = True
            _lock.notify_all()

    def _start(self):  # with _lock held
        self.started = True
        if self in _queue:
            _queue.remove(self)
        threading.Thread(target=self._run, name=f"job:{self.name}", daemon=True).start()

    def result(self):
        global _waiting
        waiter = getattr(_current, "job", None)  # None: one of pytest's threads
        with _lock:
            if not self.started:
                self._start()
            if not self.done:  # while this thread waits, one more job may run
                if waiter is None:
                    _waiting += 1
                else:
                    waiter.blocked += 1
                _lock.notify_all()
                try:
                    while not self.done:
                        _lock.wait()
                finally:
                    if waiter is None:
                        _waiting -= 1
                    else:
                        waiter.blocked -= 1
        if self.error is not None:
            raise self.error
        return self.value


def _tmp_dir() -> str:
    global _tmp_root
    with _lock:
        if _tmp_root is None:
            _tmp_root = tempfile.mkdtemp(prefix="mllm_jax_test_jobs_")
        return _tmp_root


def fixture(fn: Callable[[Path], object]):
    """``@jobs.fixture def name(tmp: Path) -> value``: a session fixture ``name`` whose value ``fn``
    computes in the background (see the module's docstring)."""
    name = fn.__name__
    job = _jobs.get(name)
    if job is None:
        job = _jobs[name] = Job(name, fn)
    else:  # the same module imported again under another name (tests import each other's helpers)
        assert job.fn.__code__.co_filename == fn.__code__.co_filename, f"two jobs named {name}"

    def get():
        return job.result()

    get.__doc__ = fn.__doc__
    get = pytest.fixture(scope="session", name=name)(get)

    return get


def _running() -> int:
    return sum(1 for j in _jobs.values() if j.started and not j.done and not j.blocked)


def _alive() -> int:
    return sum(1 for j in _jobs.values() if j.started and not j.done)


def _scheduler():
    while True:
        with _lock:
            while _queue and _running() >= SLOTS + _waiting:
                _lock.wait()
            if not _queue:
                return
            _queue[0]._start()


def start(fixture_names_in_order: list[str]):
    """Queue the jobs among these fixture names (the selected tests', in their order) and start them."""
    with _lock:
        for name in fixture_names_in_order:
            job = _jobs.get(name)
            if job is not None and not job.started and job not in _queue:
                _queue.append(job)
    if _queue and SLOTS > 0:
        threading.Thread(target=_scheduler, name="jobs", daemon=True).start()
    if _queue and ZYGOTE:  # its imports take seconds: start it now, next to the first tests
        threading.Thread(target=_get_zygote, name="zygote-start", daemon=True).start()


def result(fixture_name: str):
    """The value of the job behind a fixture, for a job that needs another one's."""
    return _jobs[fixture_name].result()


def is_job(fixture_name: str) -> bool:
    return fixture_name in _jobs


def finish():
    """At the end of the session no test needs a job any more: stop the commands of those still
    running (the session stopped early) and start no more, let their threads end, and remove their
    directories."""
    global _closing
    deadline = time.time() + 60
    with _lock:
        _closing = True
        _queue.clear()
        while True:
            for proc in _procs:
                if proc.poll() is None:
                    proc.kill()
            if not _alive() or time.time() > deadline:
                break
            _lock.wait(timeout=0.2)
    if _zygote:
        _zygote.close()
    if _tmp_root is not None:
        shutil.rmtree(_tmp_root, ignore_errors=True)


def timings() -> dict[str, tuple[float, float]]:
    """name -> (seconds, CPU seconds of its forked commands) of the jobs that ran."""
    return {name: (job.seconds, job.cpu_seconds) for name, job in _jobs.items() if job.done}


# ---------------------------------------------------------------- helpers for the jobs' commands


_procs: set = set()  # the jobs' commands, stopped at the end of the session
_zygote = None  # tests/zygote.py's server, started by the first command that can use it
_zygote_lock = threading.Lock()
ZYGOTE = os.environ.get("MLLM_JAX_TEST_ZYGOTE", "1") != "0"


def _get_zygote():
    global _zygote
    with _zygote_lock:
        if _zygote is None:
            import zygote

            _zygote = zygote.start() or False
        return _zygote


def popen(argv: list[str], *, cwd=ROOT, env=None, input: str | None = None, fresh=False, **kwargs):
    """Start ``argv``: a ``python`` command (``sys.executable`` first) as a fork of tests/zygote.py's
    server unless ``fresh`` (or its environment differs where JAX reads it at import), anything else as
    a ``subprocess.Popen`` (text mode; ``kwargs`` for it: stdout, stderr). Either way a Popen-like handle
    that ``finish`` stops if it outlives the session; stdin is ``input`` (else empty)."""
    server = None
    if ZYGOTE and not fresh and argv[0] == sys.executable:
        server = _get_zygote()
    with _lock:
        if _closing:
            raise RuntimeError(f"the session is over: not starting {argv[:4]}")
    if server and server.serves(env):
        proc = server.popen(argv[1:], cwd=cwd, env=env, input=input, tmpdir=_tmp_dir())
    else:
        kwargs.setdefault("stdin", subprocess.PIPE if input is not None else subprocess.DEVNULL)
        proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True, **kwargs)
        if input is not None:
            proc.stdin.write(input)
            proc.stdin.close()
            proc.stdin = None
    with _lock:
        _procs.add(proc)
    return proc


def run(argv: list[str], *, env=None, input: str | None = None, timeout: float = 900, cwd=ROOT, fresh=False):
    """``subprocess.run`` of a command (through ``popen``), its output captured as text."""
    proc = popen(
        argv, cwd=cwd, env=env, input=input, fresh=fresh, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{argv[:4]} ran past {timeout} s: {err[-3000:]}") from None
    finally:
        with _lock:
            _procs.discard(proc)
    job = getattr(_current, "job", None)
    if job is not None:
        job.cpu_seconds += getattr(proc, "cpu_seconds", 0.0)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def python(*args: str, **kwargs):
    """``run([sys.executable, *args])``."""
    return run([sys.executable, *args], **kwargs)


def check(r: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert r.returncode == code, f"exit code {r.returncode}, expected {code}: {r.stderr[-3000:]}"
    return r
