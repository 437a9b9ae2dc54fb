"""gs:// wherever a path goes, against a GCS emulator on 127.0.0.1 (tests/gcs.py): the path layer
itself, then a run whose workdir and data are in a bucket (train, SIGTERM, resume, export)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import gcs
import jobs
import numpy as np
import pytest
from commands import main_cmd, module_cmd
from PIL import Image

from mllm_jax import paths
from mllm_jax.errors import ConfigError


@pytest.fixture(scope="module")
def emulator():
    emu = gcs.Emulator()
    yield emu
    emu.stop()


@pytest.fixture
def bucket(emulator, monkeypatch):
    import gcsfs

    for key, value in emulator.env.items():
        monkeypatch.setenv(key, value)
    gcsfs.GCSFileSystem.clear_instance_cache()  # a filesystem made before would talk to real GCS
    yield "gs://bucket"
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_files_and_folders_in_a_bucket(bucket, tmp_path):
    run = paths.join(bucket, "t1", "run")
    assert run == "gs://bucket/t1/run" and paths.dirname(run) == "gs://bucket/t1"
    assert not paths.exists(run)
    paths.write_text(paths.join(run, "a.json"), '{"x": 1}')
    assert paths.isdir(run) and paths.isfile(paths.join(run, "a.json"))
    assert json.loads(paths.read_text(paths.join(run, "a.json"))) == {"x": 1}
    with pytest.raises(ValueError, match="appending"):
        paths.open_file(paths.join(run, "a.json"), "a")
    with paths.Staged(paths.join(run, "hf")) as local:  # written locally, then uploaded
        assert not paths.is_remote(local)
        os.makedirs(os.path.join(local, "sub"))
        with open(os.path.join(local, "sub", "b.txt"), "w") as f:
            f.write("b")
    assert paths.listdir(run) == ["a.json", "hf"]
    copy = paths.local_dir(run)
    assert open(os.path.join(copy, "hf", "sub", "b.txt")).read() == "b"
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(str(tmp_path), "gs:"))


def test_other_schemes_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"--workdir='s3://b/run': only local paths and gs://"):
        paths.check("s3://b/run", "--workdir")
    assert paths.check("/tmp/run", "--workdir") == "/tmp/run"


def test_images_and_image_roots_in_a_bucket(bucket):
    from mllm_jax.data.transforms import load_image, safe_join
    from mllm_jax.errors import BadExample

    root = paths.join(bucket, "t2", "images")
    pixels = np.zeros((5, 7, 3), np.uint8)
    pixels[..., 0] = 200
    with paths.open_file(paths.join(root, "red.png"), "wb") as f:
        Image.fromarray(pixels).save(f, format="PNG")
    image = load_image(safe_join(root, "./red.png"))
    assert image.size == (7, 5) and image.getpixel((0, 0)) == (200, 0, 0)
    with pytest.raises(BadExample, match="escapes the image root"):
        safe_join(root, "a/../../b.png")
    with pytest.raises(BadExample) as e:
        load_image(safe_join(root, "missing.png"))
    assert e.value.reason == "missing_image"


# ---------------------------------------------------------------- a run in a bucket

STEPS = ["--config.stages.align.steps=6", "--config.stages.instruct.steps=4", "--config.checkpoint_every=2"]


def _llava_json(env) -> None:
    """A LLaVA-format file and its images in the bucket (the align stage reads it)."""
    words = ["red", "blue", "green", "yellow"]
    code = f"""
import json, numpy as np
from PIL import Image
from mllm_jax import paths
records = []
for i, word in enumerate({words!r} * 4):
    name = f"img/{{i}}.png"
    with paths.open_file("gs://bucket/data/" + name, "wb") as f:
        Image.fromarray(np.full((32, 32, 3), 60 * (i % 4), np.uint8)).save(f, format="PNG")
    turns = [{{"from": "human", "value": "<image>"}}, {{"from": "gpt", "value": "a " + word + " square"}}]
    records.append({{"id": str(i), "image": name, "conversations": turns}})
paths.write_text("gs://bucket/data/llava.json", json.dumps(records))
"""
    jobs.check(jobs.python("-c", code, env=env))


@jobs.fixture
def bucket_run(tmp):
    """Train with ``--workdir=gs://bucket/run`` (align on LLaVA JSON in the bucket), SIGTERM after two
    rows, rerun to the end, export to a local HF dir: what each step left."""
    emu = gcs.Emulator()
    try:
        env = dict(os.environ, **emu.env)
        _llava_json(env)
        data = [
            "--config.stages.align.data.source=llava_json",
            "--config.stages.align.data.path=gs://bucket/data/llava.json",
            "--config.stages.align.data.image_root=gs://bucket/data",
        ]
        cmd = main_cmd("gs://bucket/run", *STEPS, *data)
        stderr = tmp / "first.err"
        with open(stderr, "w") as err:
            # its own interpreter, whose stderr is this file (the zygote's children write their own)
            proc = jobs.popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, fresh=True)
            deadline = time.time() + 900
            while proc.poll() is None and time.time() < deadline:
                if "[align] 2/6" in stderr.read_text():
                    proc.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.05)
            proc.wait(900)
        first = (proc.returncode, stderr.read_text())
        second = jobs.run(cmd, env=env, timeout=900)
        metrics = jobs.python(
            "-c",
            "from mllm_jax import paths; print(paths.read_text('gs://bucket/run/metrics.jsonl'))",
            env=env,
        )
        hf_dir = str(tmp / "hf")
        export = jobs.run(
            module_cmd("mllm_jax.convert", "--from=gs://bucket/run", f"--to_hf={hf_dir}"), env=env
        )
        load = (
            "import sys, transformers; m, info = transformers.LlavaForConditionalGeneration.from_pretrained("
            "sys.argv[1], output_loading_info=True); print(sorted(info['missing_keys']))"
        )
        loaded = jobs.run([sys.executable, "-c", load, hf_dir])
        return first, second, metrics, export, loaded
    finally:
        emu.stop()


def test_a_run_in_a_bucket_survives_sigterm_resumes_and_exports(bucket_run):
    (code, err), second, metrics, export, loaded = bucket_run
    assert code == 143, err[-3000:]
    jobs.check(second)
    assert "resuming from step" in second.stderr
    rows = [json.loads(line) for line in jobs.check(metrics).stdout.splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # each step once, to the end
    assert any("eval/vqa_accuracy" in r for r in rows)
    jobs.check(export)
    assert jobs.check(loaded).stdout.strip() == "[]"  # transformers finds every weight
    assert not os.path.exists(os.path.join(jobs.ROOT, "gs:"))  # never a local folder named gs:
