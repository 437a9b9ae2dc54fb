"""Shared fixtures: tiny HF checkpoints are built once per session (they cost seconds each); the JAX
compilation cache; background jobs (tests/jobs.py)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# A persistent compilation cache for this session, in a fresh directory (so that a run's time does not
# depend on earlier runs): the same small programs, compiled by many tests and by the commands they run
# (subprocesses inherit the environment), are compiled once. JAX reads these when it is imported, so
# they are set before anything imports it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mllm_jax_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# Tests compile many small programs and run each a few times: LLVM's optimisations cost a third of the
# suite's CPU time and buy nothing here (numerics do not depend on them; XLA's own passes still run).
# Commands the tests run inherit it; commands.xla_env keeps it when a test sets its device count.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# The tests run on the CPU. Without this an installed libtpu (the test extra's jax[tpu], for plan) first
# looks for a TPU, asking the GCE metadata server, which on some machines answers 403 to retries for
# tens of seconds per process. (plan's tests remove it for the commands that compile for TPU slices.)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
assert "jax" not in sys.modules, "conftest.py must set JAX's cache before JAX is imported"

import hf_fixtures  # noqa: E402
import jobs  # noqa: E402

# name -> build_llava kwargs. Together they cover GQA, feature layers -2/-1/list, "default"/"full",
# CLIP/SigLIP, tied embeddings, llama3/linear RoPE scaling and the Mistral/Qwen2 decoders.
LLAVA_VARIANTS = {
    "clip_default": dict(),
    "clip_full_tied_llama3": dict(
        feature_layer=-1,
        strategy="full",
        text=dict(
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "siglip_qwen2_linear": dict(
        vision="siglip",
        feature_layer=-1,
        strategy="full",
        projector_act="gelu_pytorch_tanh",
        text=dict(model_type="qwen2", rope_scaling=dict(rope_type="linear", factor=2.0)),
    ),
    "clip_layers_mistral": dict(feature_layer=[-3, -1], text=dict(model_type="mistral", sliding_window=64)),
}


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """``llava_dir(name)`` -> path of the tiny HF LLaVA checkpoint for that variant (built once)."""
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            path = str(tmp_path_factory.mktemp(f"llava_{name}"))
            hf_fixtures.build_llava(path, seed=len(cache), **LLAVA_VARIANTS[name])
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("images"))
    return [
        hf_fixtures.save_image(d, seed, size) for seed, size in ((0, (20, 24)), (1, (32, 16)), (2, (16, 16)))
    ]


# ---------------------------------------------------------------- background jobs (tests/jobs.py)


def _uses_jobs(item) -> bool:
    return any(jobs.is_job(name) for name in item.fixturenames)


def pytest_collection_modifyitems(session, config, items):
    """Modules whose tests use background jobs run after the others (each module's tests stay together,
    in their order): their jobs run meanwhile."""
    late = {item.module.__name__ for item in items if _uses_jobs(item)}
    items.sort(key=lambda item: item.module.__name__ in late)


def _skipped(item) -> bool:
    """Marked to be skipped whatever happens (``skip``, or ``skipif`` with a plain bool)."""
    if item.get_closest_marker("skip"):
        return True
    return any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    jobs.start([name for item in session.items if not _skipped(item) for name in item.fixturenames])


def pytest_sessionfinish(session):
    jobs.finish()


def pytest_terminal_summary(terminalreporter):
    import resource

    done = jobs.timings()
    if done:
        line = ", ".join(
            f"{name} {seconds:.0f}s" + (f" ({cpu:.0f}s CPU)" if cpu else "")
            for name, (seconds, cpu) in sorted(done.items(), key=lambda x: -x[1][0])
        )
        terminalreporter.write_line(f"background jobs: {line}")
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    terminalreporter.write_line(
        f"CPU: pytest's process {own.ru_utime + own.ru_stime:.0f}s, "
        f"ended commands {children.ru_utime + children.ru_stime:.0f}s"
    )
