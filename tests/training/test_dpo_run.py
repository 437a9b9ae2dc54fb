"""``configs/llava.py:tiny_dpo`` through ``python -m mllm_jax.main`` (shrunk, without align): instruct, then
a DPO stage on a preference JSON file with bad records; POPE after instruct and after DPO; and the
one-line errors of a DPO stage on the wrong data or a tokenizer without yes / no. Background jobs
(tests/jobs.py)."""

import json
import math
import sys

import jobs
import numpy as np
import pytest
from commands import SIGTERM_AFTER_STEP, main_cmd, read_metrics
from PIL import Image

PAIRS = [
    ("is there a red circle in the image ?", "yes", "no"),
    ("what color is the circle ?", "red", "blue"),
    ("is there a green square in the image ?", "no", "yes"),
]
BAD = [{"prompt": "what color is the circle ?", "chosen": "red"}, "no object"]
FLAGS = [
    "--config.stage_order=('instruct','dpo')",  # align adds nothing here but a compilation
    "--config.stages.instruct.steps=2",
    "--config.stages.dpo.steps=3",
    "--config.stages.dpo.batch_size=4",
    "--config.eval.num_pope=6",
]


def write_pairs(root):
    """A JSONL preference file (a red circle on black; two records malformed): ``(path, image root)``."""
    image = np.zeros((32, 32, 3), np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    image[(yy - 16) ** 2 + (xx - 16) ** 2 <= 64] = (255, 0, 0)
    Image.fromarray(image).save(root / "circle.png")
    records = [{"image": "circle.png", "prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS] * 4
    lines = [json.dumps(r) for r in records] + [json.dumps(b) for b in BAD]
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines))
    return str(path), str(root)


def dpo_cmd(tmp) -> list[str]:
    path, root = write_pairs(tmp)
    return main_cmd(
        str(tmp / "run"),
        *FLAGS,
        "--config.stages.dpo.data.source=preference_json",
        f"--config.stages.dpo.data.path={path}",
        f"--config.stages.dpo.data.image_root={root}",
        "--config.stages.dpo.data.max_skipped_fraction=0.5",
        config="configs/llava.py:tiny_dpo",
    )


@jobs.fixture
def dpo_run(tmp):
    jobs.check(jobs.run(dpo_cmd(tmp)))
    return read_metrics(str(tmp / "run"))


@jobs.fixture
def dpo_resumed(tmp):
    """The same run stopped by SIGTERM right after its 4th step (DPO's 2nd), then run to its end."""
    jobs.result("dpo_run")  # whose compilations (in the session's cache) this one reuses
    cmd = dpo_cmd(tmp)
    jobs.check(jobs.run([sys.executable, "-c", SIGTERM_AFTER_STEP, "4", *cmd[3:]]), 143)
    jobs.check(jobs.run(cmd))
    return read_metrics(str(tmp / "run"))


def test_a_dpo_stage_resumed_mid_stage_keeps_its_reference(dpo_run, dpo_resumed):
    """The reference is the stage's starting params, saved with the mid-stage checkpoint: after a
    resume the margins are measured against it, not against the resumed params."""
    dpo = lambda rows: [r for r in rows if r["stage"] == "dpo" and "dpo/loss" in r]  # noqa: E731
    assert len(dpo(dpo_resumed)) == len(dpo(dpo_run)) == 3
    for a, b in zip(dpo(dpo_resumed), dpo(dpo_run), strict=True):
        for key in ("dpo/loss", "dpo/reward_margin", "loss"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])


def test_tiny_dpo_logs_the_dpo_metrics_and_pope_after_instruct_and_dpo(dpo_run):
    rows = [r for r in dpo_run if r["stage"] == "dpo" and "dpo/loss" in r]
    assert [r["stage_step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"dpo/loss", "dpo/reward_margin", "dpo/accuracy"} <= set(r)
        assert r["data/skipped/bad_preference"] >= 1
    # the first step's policy is its reference: every margin is 0
    assert abs(rows[0]["dpo/loss"] - math.log(2)) < 1e-6 and rows[0]["dpo/reward_margin"] == 0.0
    evals = [r for r in dpo_run if "eval/pope_accuracy" in r]
    assert [r["stage"] for r in evals] == ["instruct", "dpo"]
    for r in evals:
        for key in (
            "eval/pope_f1",
            "eval/pope_yes_ratio",
            "eval/pope_accuracy/adversarial",
            "eval/vqa_accuracy",
        ):
            assert 0.0 <= r[key] <= 1.0


ERRORS = {
    "--config.stages.dpo.data.task=vqa": "config.stages.dpo.data.task: source 'synthetic' task 'vqa' in a "
    "stage with loss 'dpo'",
    "--config.synthetic.existence_questions=False": "config.eval.num_pope asks yes / no existence questions",
}


@jobs.fixture
def dpo_mistakes(tmp):
    return {
        flag: jobs.run(main_cmd(str(tmp / str(i)), *FLAGS, flag, config="configs/llava.py:tiny_dpo"))
        for i, flag in enumerate(ERRORS)
    }


@pytest.mark.parametrize(("flag", "message"), ERRORS.items())
def test_dpo_mistakes_are_one_line(flag, message, dpo_mistakes):
    r = dpo_mistakes[flag]
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
