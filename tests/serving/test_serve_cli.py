"""`python -m mllm_jax.serve` as a program: it binds 127.0.0.1 by default, says where on its first stdout
line, answers /health and /v1/models, and stops on SIGINT; bad flags are one line and exit code 2. The
commands run as background jobs (tests/jobs.py)."""

import json

import jobs

# starts the server on a tiny LLaVA, asks /health and /v1/models, stops it: prints what it saw
PROBE = """
import json, signal, subprocess, sys, urllib.request
sys.path.insert(0, "tests")
import hf_fixtures
hf_fixtures.build_llava(sys.argv[1])
proc = subprocess.Popen([sys.executable, "-m", "mllm_jax.serve", "--model=" + sys.argv[1], "--port=0"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
first = proc.stdout.readline().strip()
url = first.split(" on ")[1]
get = lambda path: json.load(urllib.request.urlopen(url + path, timeout=60))
seen = {"first_line": first, "health": get("/health"), "models": get("/v1/models")}
proc.send_signal(signal.SIGINT)
seen["exit"] = proc.wait(timeout=300)  # SIGINT waits for a compilation under way
print(json.dumps(seen))
"""


@jobs.fixture
def serve_runs(tmp):
    probe = jobs.python("-c", PROBE, str(tmp / "tiny_llava"))
    missing = jobs.python("-m", "mllm_jax.serve", f"--model={tmp / 'nope'}")
    bad_batch = jobs.python("-m", "mllm_jax.serve", f"--model={tmp / 'tiny_llava'}", "--max_batch=0")
    return probe, missing, bad_batch


def test_serve_starts_answers_and_stops(serve_runs):
    probe = jobs.check(serve_runs[0])
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["first_line"].startswith("serving tiny_llava on http://127.0.0.1:")
    assert seen["health"] == {"status": "ok"}
    assert [m["id"] for m in seen["models"]["data"]] == ["tiny_llava"]
    assert seen["exit"] == 0


def test_bad_flags_are_one_line_and_exit_2(serve_runs):
    for r, message in zip(serve_runs[1:], ["no such directory", "--max_batch must be >= 1"], strict=True):
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr
