"""Fault injection through the public command: preemption at several points, a half-written checkpoint,
corrupt and hostile data, NaN steps, and config mistakes. The commands run as background jobs
(tests/jobs.py) and share the session's JAX compilation cache, so only the first run of each shape pays
for compiling."""

import ast
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jobs
import numpy as np
import pytest
from commands import ROOT, SIGTERM_AFTER_STEP, main_cmd, read_metrics, rows
from PIL import Image

from mllm_jax.families import store
from mllm_jax.models import params as param_tree

# Two stages with mid-stage checkpoints (async, the default) every 2 steps; global steps 1-10 are
# `align`, 11-30 `instruct`.
ALIGN, INSTRUCT = 10, 20
CHAIN = [
    f"--config.stages.align.steps={ALIGN}",
    f"--config.stages.instruct.steps={INSTRUCT}",
    "--config.checkpoint_every=2",
]
COMPARED = ("loss", "accuracy", "grad_norm", "learning_rate", "target_tokens", "train/", "eval/")


def launch(workdir, *flags, env=None):
    return jobs.popen(
        main_cmd(workdir, *flags),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(proc, timeout=300):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run(workdir, *flags, env=None, stdin_text=None):
    r = jobs.run(main_cmd(workdir, *flags), env=env, input=stdin_text, timeout=300)
    return r.returncode, r.stderr


def signal_when(proc, condition, sig, what: str, timeout=240):
    """Send ``sig`` as soon as ``condition()`` holds (polled every millisecond)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}: {err[-1500:]}")
        if condition():
            proc.send_signal(sig)
            return
        time.sleep(0.001)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def writing(workdir, after: int, before: int) -> bool:
    """A step in (after, before) is being written (orbax's temporary directory is there)."""
    try:
        names = os.listdir(os.path.join(workdir, store.CHECKPOINTS))
    except FileNotFoundError:
        return False
    steps = [int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n]
    return any(after < s < before for s in steps)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@jobs.fixture
def reference(tmp):
    """The chain run straight through."""
    workdir = str(tmp / "run")
    code, err = run(workdir, *CHAIN)
    assert code == 0, err[-3000:]
    return workdir


@jobs.fixture
def preempted(tmp):
    """The chain stopped four times, each time at a different point, then run to its end: the workdir
    and what each stop left (exit code, stderr, newest checkpoint, ...)."""
    jobs.result("reference")  # whose compilations (in the session's cache) these runs reuse
    workdir = str(tmp / "interrupted")
    ckpt = lambda: store.latest_step(workdir)  # noqa: E731
    seen = {}

    # 1. SIGTERM during a step of `align`: saved at the next step boundary, exit 143
    proc = launch(workdir, *CHAIN)
    signal_when(proc, lambda: len(rows(workdir)) >= 2, signal.SIGTERM, "two rows")
    seen["align"] = (*finish(proc), ckpt())

    # 2. SIGTERM between the stages (align evaluated, its final checkpoint being written): the run
    # stops at the stage boundary, with align's final checkpoint
    proc = launch(workdir, *CHAIN)
    align_done = lambda: any("eval/vqa_accuracy" in r for r in rows(workdir))  # noqa: E731
    signal_when(proc, align_done, signal.SIGTERM, "align's evaluation")
    seen["between"] = (*finish(proc), ckpt())

    # 3. SIGTERM while a mid-stage checkpoint is being written in the background
    end = ALIGN + INSTRUCT
    proc = launch(workdir, *CHAIN)
    second = seen["between"][2] or 0
    signal_when(proc, lambda: writing(workdir, second, end - 4), signal.SIGTERM, "a checkpoint write")
    seen["writing"] = (*finish(proc), ckpt())

    # 4. SIGKILL while a checkpoint is being written: the half-written step is not the newest
    proc = launch(workdir, *CHAIN)
    third = seen["writing"][2] or 0
    signal_when(proc, lambda: writing(workdir, third, end), signal.SIGKILL, "a second checkpoint write")
    seen["killed"] = (*finish(proc), ckpt(), os.listdir(os.path.join(workdir, store.CHECKPOINTS)))

    # 5. the same command once more runs to the end
    seen["end"] = run(workdir, *CHAIN)
    return workdir, seen


def test_preempted_at_several_points_the_reruns_end_like_an_uninterrupted_run(reference, preempted):
    workdir, seen = preempted
    code, err, first = seen["align"]
    assert code == 143, err[-3000:]
    assert 2 <= first < ALIGN, first

    code, err, second = seen["between"]
    assert code == 143, err[-3000:]
    assert second == ALIGN, second

    end = ALIGN + INSTRUCT
    code, err, third = seen["writing"]
    assert code == 143, err[-3000:]
    assert second < third < end, third

    code, err, newest, names = seen["killed"]
    assert code == -signal.SIGKILL
    half_written = [int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n]
    assert newest == max(int(n) for n in names if n.isdigit()) and all(s > newest for s in half_written)

    code, err = seen["end"]
    assert code == 0, err[-3000:]
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(os.path.join(workdir, "checkpoints")))
    expected, got = read_metrics(reference), read_metrics(workdir)
    assert [(r["step"], r["stage"]) for r in got] == [(r["step"], r["stage"]) for r in expected]
    for want, have in zip(expected, got, strict=True):
        for key, value in want.items():
            if key.startswith(COMPARED) and not key.endswith("_per_sec"):  # rates are timings
                assert abs(value - have[key]) <= 1e-6, (want["step"], key, value, have[key])
    assert [r["step"] for r in got if "eval/vqa_accuracy" in r] == [ALIGN, end]


@jobs.fixture
def last_step_stopped(tmp):
    """SIGTERM right after the last step of `align`, then the same command again: ``(workdir, the
    stopped run, its newest checkpoint, the rerun)``."""
    jobs.result("reference")  # whose compilations (in the session's cache) these runs reuse
    workdir = str(tmp / "last_step")
    cmd = [sys.executable, "-c", SIGTERM_AFTER_STEP, str(ALIGN), *main_cmd(workdir, *CHAIN)[3:]]
    stopped = jobs.run(cmd)
    newest = store.latest_step(workdir)
    return workdir, stopped, newest, jobs.run(main_cmd(workdir, *CHAIN))


def test_sigterm_in_the_last_step_of_a_stage_keeps_its_evaluation(reference, last_step_stopped):
    workdir, stopped, newest, rerun = last_step_stopped
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert newest == ALIGN
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    evals = [r["step"] for r in read_metrics(workdir) if "eval/vqa_accuracy" in r]
    assert evals == [r["step"] for r in read_metrics(reference) if "eval/vqa_accuracy" in r]


@jobs.fixture
def mismatched(tmp):
    """A copy of the reference run, rerun with a model its checkpoint does not fit: ``(workdir, its
    newest checkpoint before, exit code, stderr)``."""
    workdir = str(tmp / "run")
    shutil.copytree(jobs.result("reference"), workdir)
    before = store.latest_step(workdir)
    return workdir, before, *run(workdir, *CHAIN, "--config.model.scan_layers=True")


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line_and_stays_intact(mismatched):
    workdir, before, code, err = mismatched
    assert code == 2, err[-3000:]
    assert re.fullmatch(
        rf"error: checkpoint step {before} does not match the model: llm/layers/\S+ is in the config but not "
        r"in the checkpoint",
        error_line(err),
    ), error_line(err)
    assert store.latest_step(workdir) == before
    assert param_tree.flatten(store.load_model(workdir).params)


# ---------------------------------------------------------------- bad data and NaN steps


@jobs.fixture
def dirty_json(root):
    """40 real PNGs of which 2 (5%) are corrupt (truncated, garbage), plus a record whose path leaves
    the image root (to a valid PNG there) and one whose image is missing: the flags of a run on them."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(40):
        path = images / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        names.append(path.name)
    data = (images / "003.png").read_bytes()
    (images / "003.png").write_bytes(data[: len(data) // 2])  # truncated
    (images / "017.png").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())  # garbage
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "outside.png")
    names += ["../outside.png", "missing.png"]
    records = [
        {
            "id": str(i),
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the circle ?"},
                {"from": "gpt", "value": ["red", "blue", "green"][i % 3]},
            ],
        }
        for i, name in enumerate(names)
    ]
    (root / "data.json").write_text(json.dumps(records))
    return [
        "--config.stage_order=('instruct',)",
        "--config.stages.instruct.steps=12",
        "--config.stages.instruct.data.source=llava_json",
        f"--config.stages.instruct.data.path={root / 'data.json'}",
        f"--config.stages.instruct.data.image_root={images}",
        "--config.stages.instruct.data.max_length=48",
        "--config.eval.num_questions=0",
    ]


@jobs.fixture
def dirty_run(tmp):
    """The dirty data with a NaN injected at step 5, a checkpoint at every step."""
    workdir = str(tmp / "run")
    nan_env = dict(os.environ, MLLM_JAX_INJECT_NAN_STEPS="5")
    flags = ("--config.checkpoint_every=1", "--config.keep_checkpoints=20")
    code, err = run(workdir, *jobs.result("dirty_json"), *flags, env=nan_env)
    assert code == 0, err[-3000:]
    return workdir


def test_corrupt_images_are_skipped_and_counted_and_a_nan_step_changes_nothing(dirty_run):
    workdir = dirty_run
    got = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, 13))
    # 12 batches of 4 = 48 good examples > the 38 good ones: every record was read at least once
    last = got[-1]
    assert 2 <= last["data/skipped/bad_image"] <= 4
    assert 1 <= last["data/skipped/unsafe_path"] <= 2
    assert 1 <= last["data/skipped/missing_image"] <= 2
    assert last["data/skipped"] == sum(v for k, v in last.items() if k.startswith("data/skipped/"))
    # the NaN step is skipped and counted; every other step trains
    assert [r["train/skipped_steps"] for r in got] == [0] * 4 + [1] * 8
    assert not math.isfinite(got[4]["loss"])
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(got) if i != 4)
    params = {s: param_tree.flatten(store.load_model(workdir, s).params) for s in (4, 5, 6)}
    for path, value in params[4].items():
        np.testing.assert_array_equal(params[5][path], value, err_msg=path)
    assert any(not np.array_equal(params[6][p], v) for p, v in params[5].items())


@jobs.fixture
def diverged(tmp):
    """NaN at steps 3 and 4 with max_bad_steps=2: ``(workdir, exit code, stderr)``."""
    jobs.result("dirty_run")  # whose compilations (in the session's cache) this run reuses
    workdir = str(tmp / "diverged")
    nan_env = dict(os.environ, MLLM_JAX_INJECT_NAN_STEPS="3,4")
    flags = ("--config.checkpoint_every=2", "--config.max_bad_steps=2")
    return workdir, *run(workdir, *jobs.result("dirty_json"), *flags, env=nan_env)


def test_too_many_nan_steps_in_a_row_stop_with_the_last_good_checkpoint_intact(diverged, dirty_run):
    workdir, code, err = diverged
    assert code == 1, err[-3000:]
    line = error_line(err)
    assert "2 non-finite steps in a row" in line and "max_bad_steps" in line, line
    assert store.latest_step(workdir) == 2
    assert sorted(os.listdir(os.path.join(workdir, store.CHECKPOINTS))) == ["2"]
    # step 2 as the run without the NaN streak saved it, bit for bit
    kept = param_tree.flatten(store.load_model(workdir).params)
    for path, value in param_tree.flatten(store.load_model(dirty_run, 2).params).items():
        np.testing.assert_array_equal(kept[path], value, err_msg=path)


# ---------------------------------------------------------------- config and input mistakes


BUILD_CLIP = """
import sys
sys.path.insert(0, "tests")
from hf_fixtures import build_vision
build_vision(sys.argv[1], "clip", seed=0)
"""


def write_bad_inputs(root):
    """Directories the bad-config cases point at: a CLIP (not LLaVA) HF dir, an empty shard dir, and
    a tokenizer dir whose config asks for its own Python code (which would leave a marker file)."""
    clip = str(root / "clip")
    jobs.check(jobs.python("-c", BUILD_CLIP, clip))
    (root / "no_shards").mkdir()
    evil = root / "evil_tokenizer"
    evil.mkdir()
    marker = root / "remote_code_ran"
    (evil / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    auto_map = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (evil / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": auto_map})
    )
    (root / "data.json").write_text("[]")
    return {"root": root, "clip": clip, "evil": str(evil), "marker": marker}


DATA = "--config.stages.align.data."
# name -> (flags, given write_bad_inputs' dict; what the error line says)
CASES = {
    "unknown_key": (lambda d: ["--config.stages.align.stepz=3"], "did you mean config.stages.align.steps?"),
    "not_an_int": (
        lambda d: ["--config.stages.align.steps=abc"],
        "config.stages.align.steps must be an integer",
    ),
    "float_for_int": (lambda d: ["--config.stages.align.steps=1.5"], "must be an integer, got '1.5'"),
    "bad_dtype": (lambda d: ["--config.dtype=fp16"], "config.dtype must be one of"),
    "mesh": (lambda d: ["--config.mesh.data=3"], "has 3 devices, but 1 are available"),
    "missing_json": (
        lambda d: [f"{DATA}source=llava_json", f"{DATA}path={d['root'] / 'nope.json'}"],
        "config.stages.align.data.path=",
    ),
    "missing_image_root": (
        lambda d: [
            f"{DATA}source=llava_json",
            f"{DATA}path={d['root'] / 'data.json'}",
            f"{DATA}image_root={d['root'] / 'nope'}",
        ],
        "config.stages.align.data.image_root=",
    ),
    "no_shards": (
        lambda d: [f"{DATA}source=webdataset", f"{DATA}path={d['root'] / 'no_shards'}"],
        "no .tar shards there",
    ),
    "hf_not_llava": (
        lambda d: [f"--config.model.init.hf={d['clip']}"],
        "holds a 'vit' model; expected 'llava'",
    ),
    "llm_not_llm": (
        lambda d: [f"--config.model.init.vision={d['clip']}", f"--config.model.init.llm={d['clip']}"],
        "holds a 'vit' model; expected 'llm'",
    ),
    "remote_code_tokenizer": (lambda d: [f"--config.model.tokenizer={d['evil']}"], "contains custom code"),
    "text_without_a_qformer": (lambda d: [f"{DATA}text_length=8"], "only an instruction-aware Q-Former"),
}


@jobs.fixture
def bad_runs(tmp):
    """Every case once, each in a workdir that does not exist beforehand; stdin answers "y" in case
    anything asks whether to run remote code: ``(inputs, {case: (exit code, stderr)})``."""
    inputs = write_bad_inputs(tmp)

    def one(name):
        flags = CASES[name][0](inputs)
        return run(str(inputs["root"] / name / "workdir"), *flags, stdin_text="y\n")

    return inputs, {name: one(name) for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_config_mistakes_are_one_line_exit_2_and_leave_the_workdir_untouched(case, bad_runs):
    inputs, runs = bad_runs
    code, err = runs[case]
    assert code == 2, err[-3000:]
    assert CASES[case][1] in error_line(err)
    assert not os.path.exists(inputs["root"] / case / "workdir")
    assert not inputs["marker"].exists()


# ---------------------------------------------------------------- untrusted files: a source audit

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def audit(source: str, name: str) -> list[str]:
    """Ways ``source`` could unpickle a file or run a model repository's code."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"{where} imports {m}" for m in modules if m.split(".")[0] in UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        restricted = func == "torch.load" and _is_true(keywords.get("weights_only"))
        if (
            func in ("torch.load", "eval", "exec")
            and not restricted
            or func.endswith(".load_state_dict_from_url")
        ):
            problems.append(f"{where} calls {func}")
        if "allow_pickle" in keywords and not (
            isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False
        ):
            problems.append(f"{where} passes allow_pickle")
        if func.endswith(".from_pretrained"):
            trust = keywords.get("trust_remote_code")
            # explicit False: transformers would otherwise *ask* on a terminal, and "y" runs the code
            if not (isinstance(trust, ast.Constant) and trust.value is False) or None in keywords:
                problems.append(f"{where} {func} without trust_remote_code=False")
    return problems


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_package_never_unpickles_or_runs_remote_code():
    """torch.load only with weights_only=True (PyTorch's restricted loader: tensors, never arbitrary
    objects), which convert --to_safetensors uses once, by explicit opt-in."""
    bad = (
        "import pickle\nfrom dill import loads\nimport torch\ntorch.load('x.bin')\n"
        "torch.load('x.bin', weights_only=False)\n"
        "np.load(p, allow_pickle=True)\n"
        "AutoTokenizer.from_pretrained(d)\nAutoProcessor.from_pretrained(d, trust_remote_code=True)\n"
        "AutoTokenizer.from_pretrained(d, trust_remote_code=False, **kw)\n"
    )
    assert len(audit(bad, "bad.py")) == 8  # the audit does see each pattern
    assert not audit("import torch\ntorch.load(p, weights_only=True)\n", "ok.py")
    package = os.path.join(ROOT, "mllm_jax")
    problems, checked = [], 0
    for folder, _, files in os.walk(package):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                with open(path) as f:
                    problems += audit(f.read(), os.path.relpath(path, ROOT))
                checked += 1
    assert checked > 20 and not problems, problems
