"""`python -m mllm_jax.serve` as a program: it binds 127.0.0.1 by default, says where on its first stdout
line, answers /health, /v1/models and concurrent chats, and stops on SIGINT; with ``--mesh`` on 4
simulated devices it answers as on one; bad flags are one line and exit code 2. The commands run as
background jobs (tests/jobs.py)."""

import json
import re

import jobs

# starts the server on a tiny LLaVA, asks /health, /v1/models and 4 concurrent greedy chats, stops it;
# then the same chats of a server on a 4-device CPU mesh (its own XLA_FLAGS): prints what it saw
PROBE = """
import base64, concurrent.futures, io, json, os, signal, subprocess, sys, tempfile, urllib.request
sys.path.insert(0, "tests")
import hf_fixtures
from commands import xla_env
hf_fixtures.build_llava(sys.argv[1])

def chat(url, i):
    buf = io.BytesIO()
    hf_fixtures.random_image(i, (20, 24)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is it ?"}]
    body = {"model": "tiny_llava", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 6}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=300))["choices"][0]["message"]["content"]

def serve(*flags, env=None):
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "mllm_jax.serve", "--model=" + sys.argv[1], "--port=0",
                             "--max_batch=4", *flags], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    first = proc.stdout.readline().strip()
    url = first.split(" on ")[1]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: chat(url, i), range(4)))
    return proc, log, first, url, answers

proc, log, first, url, answers = serve()
get = lambda path: json.load(urllib.request.urlopen(url + path, timeout=60))
seen = {"first_line": first, "health": get("/health"), "models": get("/v1/models"), "answers": answers}
proc.send_signal(signal.SIGINT)
seen["exit"] = proc.wait(timeout=300)  # SIGINT waits for a compilation under way
proc, log, _, _, seen["mesh_answers"] = serve("--mesh=data=2,fsdp=2", env=xla_env(4))
proc.send_signal(signal.SIGINT)
seen["mesh_exit"] = proc.wait(timeout=300)
log.seek(0)
seen["mesh_log"] = [line for line in log.read().splitlines() if "params on mesh" in line]
print(json.dumps(seen))
"""


@jobs.fixture
def serve_runs(tmp):
    probe = jobs.python("-c", PROBE, str(tmp / "tiny_llava"))
    missing = jobs.python("-m", "mllm_jax.serve", f"--model={tmp / 'nope'}")
    bad_batch = jobs.python("-m", "mllm_jax.serve", f"--model={tmp / 'tiny_llava'}", "--max_batch=0")
    bad_mesh = jobs.python("-m", "mllm_jax.serve", f"--model={tmp / 'tiny_llava'}", "--mesh=rows=2")
    return probe, missing, bad_batch, bad_mesh


def test_serve_starts_answers_and_stops(serve_runs):
    probe = jobs.check(serve_runs[0])
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["first_line"].startswith("serving tiny_llava on http://127.0.0.1:")
    assert seen["health"] == {"status": "ok"}
    assert [m["id"] for m in seen["models"]["data"]] == ["tiny_llava"]
    assert seen["exit"] == 0
    assert len(seen["answers"]) == 4 and len(set(seen["answers"])) > 1


def test_serve_on_a_mesh_answers_as_one_device(serve_runs):
    """``--mesh=data=2,fsdp=2`` on 4 simulated CPU devices: the params sharded (a quarter to half of the
    bytes on one device: fsdp splits the kernels it divides), the cache's 4 rows split over data x fsdp,
    and the 4 concurrent greedy answers those of one device."""
    seen = json.loads(jobs.check(serve_runs[0]).stdout.strip().splitlines()[-1])
    assert seen["mesh_answers"] == seen["answers"] and seen["mesh_exit"] == 0
    [line] = seen["mesh_log"]
    mine, total = (int(x) for x in re.search(r": (\d+) of (\d+) bytes", line).groups())
    assert "'data': 2, 'fsdp': 2" in line and mine < 0.75 * total


def test_bad_flags_are_one_line_and_exit_2(serve_runs):
    messages = ["no such directory", "--max_batch must be >= 1", "expected axis=size pairs"]
    for r, message in zip(serve_runs[1:], messages, strict=True):
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
