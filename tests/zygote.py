"""Commands without the interpreter's start-up: ``python -m mllm_jax.main ...`` as a fork of a process
that has already imported JAX, Flax, torch, transformers and mllm_jax.

Importing those costs ~3.5 s of CPU per command, and the suite runs ~80 commands (most of them exit in
well under a second after that: config and input mistakes, plans, exports). This file is both:

* the server, ``python tests/zygote.py``: imports the stack (no JAX backend is started, no command
  module that defines flags is imported), then reads requests (JSON lines on stdin) and forks one child
  per request. The child redirects stdin, stdout and stderr to the request's files, takes its cwd,
  environment and ``sys.argv``, and runs the command as the interpreter would (``-m``: ``runpy`` as
  ``__main__``; ``-c``: the code in a fresh ``__main__`` namespace; a script path: ``runpy.run_path``),
  then exits through the interpreter's normal shutdown (exit code, atexit handlers). The server reports
  each child's pid when it forks and its exit status (as ``subprocess`` reports it) when it ends.
* the client, ``Zygote.popen(argv, ...)``: a ``subprocess.Popen``-like handle (pid, poll, wait,
  send_signal, kill, communicate) on such a child.

A child is a separate process with its own exit status, signals and file descriptors, running the
command's own code from its entry point; what it shares with the server is only modules imported
before the fork, i.e. what ``python -m`` would import anyway. Environment variables that JAX or XLA
read when JAX is imported cannot differ from the server's: such requests, and ``fresh=True`` ones
(a few tests keep a plain interpreter for each command), run as plain subprocesses (tests/jobs.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading

# ---------------------------------------------------------------- the server


# What the commands import anyway: the stack, and the library less the command modules that define
# absl flags when imported (main, bench, convert: running them as __main__ would define those flags a
# second time).
PRELOAD = [
    "numpy",
    "PIL.Image",
    "absl.app",
    "ml_collections",
    "jax",
    "jax.numpy",
    "flax.linen",
    "optax",
    "orbax.checkpoint",
    "torch",
    "transformers",
    "transformers.models.auto.processing_auto",  # lazy: ~3 s per command that loads a processor
    "mllm_jax.training.train",
    "mllm_jax.training.aot",
    "mllm_jax.families.store",
    "mllm_jax.inference.generate",
    "mllm_jax.evaluation.run",
    "mllm_jax.evaluate",
    "mllm_jax.plan",
    "mllm_jax.predict",
]


def _preload():
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from jax._src import xla_bridge

    flagged = [m for m in ("mllm_jax.main", "mllm_jax.bench", "mllm_jax.convert") if m in sys.modules]
    assert not flagged, f"imported by the preload: {flagged}"
    assert not xla_bridge._backends, "the preload started a JAX backend"  # children start their own


def _reply(message: dict):
    os.write(1, (json.dumps(message) + "\n").encode())


def _serve():
    """The server's loop; returns a request in each forked child (and None when stdin closes)."""
    import select

    _preload()
    _reply({"ready": os.getpid()})
    children: dict[int, int] = {}  # pid -> request id
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.02 if children else None)
        if readable:
            data = os.read(0, 1 << 16)
            if not data:
                return None
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    return request
                children[pid] = request["id"]
                _reply({"id": request["id"], "pid": pid})
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            code, cpu = os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
            _reply({"id": children.pop(pid), "returncode": code, "cpu": cpu})


def _redirect(path: str | None, fd: int, flags: int):
    new = os.open(path or os.devnull, flags, 0o644)
    os.dup2(new, fd)
    os.close(new)


def _run(request: dict):
    """In the forked child: become the command, and end this process as the interpreter would."""
    import runpy

    _redirect(request["stdin"], 0, os.O_RDONLY)
    _redirect(request["stdout"], 1, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(request["stderr"], 2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            sys.modules.pop(argv[1], None)  # preloaded for its imports: executed afresh as __main__
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            main = type(sys)("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code)


def _exit(code: int):
    """The interpreter's exit (non-daemon threads joined, atexit handlers, std streams flushed) without
    tearing down the modules inherited from the server, which takes a second in a fork (every object's
    page is copied on the way)."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - as the interpreter, ignore a closed stream
            pass
    os._exit(code)


# ---------------------------------------------------------------- the client


class Child:
    """A ``subprocess.Popen``-like handle on a forked command; stdout and stderr are captured (text)."""

    def __init__(self, zygote: Zygote, argv: list[str], pid: int, files: dict):
        self.args, self.pid, self.returncode = argv, pid, None
        self.cpu_seconds = 0.0  # its CPU time (user + system), once it has ended
        self._zygote, self._files = zygote, files

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        import subprocess

        with self._zygote.lock:
            if not self._zygote.lock.wait_for(lambda: self.returncode is not None, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout=None):
        assert input is None, "give stdin text to Zygote.popen"
        self.wait(timeout)
        out = []
        for name in ("stdout", "stderr"):
            path = self._files[name]
            with open(path, errors="replace") as f:
                out.append(f.read())
            os.unlink(path)
        if self._files["stdin"]:
            os.unlink(self._files["stdin"])
        return tuple(out)


class Zygote:
    """A running server (started by ``start``)."""

    def __init__(self, proc):
        self.proc, self.lock = proc, threading.Condition()
        self._next, self._pids, self._children = 0, {}, {}
        self.env = dict(os.environ)  # the server's, as it imported JAX
        threading.Thread(target=self._read, name="zygote", daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.lock:
                if "pid" in message:
                    self._pids[message["id"]] = message["pid"]
                elif "returncode" in message:
                    child = self._children.pop(message["id"])
                    child.cpu_seconds, child.returncode = message["cpu"], message["returncode"]
                self.lock.notify_all()

    def serves(self, env: dict | None) -> bool:
        """Whether a command with this environment can run here (JAX and XLA read theirs at import)."""
        if self.proc.poll() is not None:
            return False
        if env is None:
            return True
        keys = {k for k in {*env, *self.env} if k.startswith(("JAX_", "XLA_", "TPU_", "LIBTPU"))}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def popen(self, argv: list[str], *, cwd: str, env=None, input: str | None = None, tmpdir=None) -> Child:
        """Fork ``python *argv`` (``-m module ...``, ``-c code ...`` or ``script ...``); its stdin (the
        ``input`` text, else empty), stdout and stderr are files in ``tmpdir``."""
        files = {}
        for name in ("stdout", "stderr"):
            fd, files[name] = tempfile.mkstemp(prefix=f"zygote_{name}_", dir=tmpdir)
            os.close(fd)
        files["stdin"] = None
        if input is not None:
            fd, files["stdin"] = tempfile.mkstemp(prefix="zygote_stdin_", dir=tmpdir)
            with os.fdopen(fd, "w") as f:
                f.write(input)
        with self.lock:
            self._next += 1
            request = dict(id=self._next, argv=argv, cwd=str(cwd), env=dict(env or os.environ), **files)
            child = Child(self, argv, 0, files)
            self._children[request["id"]] = child
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            if not self.lock.wait_for(lambda: request["id"] in self._pids, timeout=120):
                raise RuntimeError(f"tests/zygote.py's server did not start {argv[:3]}")
            child.pid = self._pids.pop(request["id"])
        return child

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def start() -> Zygote | None:
    """Start a server (None if it does not come up: the commands then run as plain subprocesses)."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    ready = proc.stdout.readline()
    if not ready.startswith('{"ready"'):
        proc.kill()
        return None
    return Zygote(proc)


if __name__ == "__main__":
    request = _serve()
    if request is not None:
        del request["id"]
        _run(request)
