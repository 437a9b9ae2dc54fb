"""`python -m mllm_jax.evaluate --task=<benchmark>` end to end on tiny fixtures in each benchmark's
released layout (tests/evaluation/benchmark_files.py) and a tiny random LLaVA: the commands (every
task once; GQA and SEED, with ``--mc=loglik``, on a mesh) run as one background job (tests/jobs.py);
each printed JSON's metrics must equal the official scoring (reference_benchmarks.py) of the written
predictions, the skipped records must be counted, and SEED's option log-likelihoods must equal
transformers' own on the same inputs. The scorers themselves are checked against faithful
re-implementations of the official scripts in test_benchmark_scores.py.

A random model answers nonsense: generation checks the plumbing and the scoring, not quality.
"""

import io
import json
import os
import zipfile
from xml.etree import ElementTree

import benchmark_files
import jobs
import numpy as np
import pytest
import reference_benchmarks as ref
import reference_pope_eval

from mllm_jax.errors import UsageError
from mllm_jax.evaluation import mme, run

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ("--batch_size=2", "--max_new_tokens=4")
# task -> its command's flags: one model and one batch shape, so that after the first command the
# compilations are hits of the session's persistent cache. --mesh on one task of each kind (generation:
# GQA; multiple choice by option likelihood: SEED); on several devices the mesh decodes as one device
# (tests/inference/test_generate_sharded.py), and every task shares the loop (evaluation/benchmark.py).
RUNS = {task: COMMON for task in benchmark_files.WRITERS} | {
    "gqa": (*COMMON, "--mesh=data=-1"),
    "seed": ("--mc=loglik", "--batch_size=3", "--mesh=data=-1"),  # 8 option rows: 3 batches
}


def _evaluate(model, task, flags, out, *extra):
    args = [f"--{k}={v}" for k, v in flags.items()]
    return jobs.python(
        "-m", "mllm_jax.evaluate", f"--model={model}", f"--task={task}", *args, *extra, f"--predictions={out}"
    )


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@jobs.fixture
def benchmark_cli(tmp):
    """The command itself (a background job): a tiny LLaVA built by a command, then every benchmark
    (``RUNS``) and two bad invocations: ``{"model", "files", "runs": {task: (result, lines, submission or
    None)}, "errors"}``."""
    model = str(tmp / "llava")
    build = (
        f"import sys; sys.path.insert(0, {TESTS!r}); import hf_fixtures; hf_fixtures.build_llava({model!r})"
    )
    jobs.check(jobs.python("-c", build))
    with open(tmp / "llava" / "tokenizer.json") as f:  # option letters as words of their own (not <unk>)
        tokenizer = json.load(f)
    vocab = tokenizer["model"]["vocab"]
    for word, letter in zip(("purple", "orange", "white", "black"), "ABCD", strict=True):
        vocab[letter] = vocab.pop(word)
    with open(tmp / "llava" / "tokenizer.json", "w") as f:
        json.dump(tokenizer, f)
    files = benchmark_files.write_all(str(tmp / "data"))
    runs = {}
    for task, extra in RUNS.items():
        out = str(tmp / f"{task}.jsonl")
        r = jobs.check(_evaluate(model, task, files[task][0], out, *extra))
        found = [p for p in os.listdir(tmp) if p.startswith(f"{task}.submission.")]
        submission = (tmp / found[0]).read_bytes() if found else None
        runs[task] = (json.loads(r.stdout), _read(out), submission)
    errors = {
        "layout": _evaluate(model, "seed", files["gqa"][0], str(tmp / "x.jsonl")),
        "mc": _evaluate(model, "gqa", files["gqa"][0], str(tmp / "y.jsonl"), "--mc=loglik"),
    }
    return {"model": model, "files": files, "runs": runs, "errors": errors}


def read_xlsx(content: bytes) -> list[list[str]]:
    """The first sheet's cells as text, read with the standard library (no spreadsheet package here)."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        assert {"[Content_Types].xml", "_rels/.rels", "xl/workbook.xml"} <= set(z.namelist())
        root = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
    rows = []
    for row in root.iterfind("m:sheetData/m:row", ns):
        cells = [c.find("m:is/m:t", ns) if c.get("t") == "inlineStr" else c.find("m:v", ns) for c in row]
        rows.append([c.text or "" for c in cells])
    return rows


def _load(path):
    with open(path) as f:
        return json.load(f)


def official(task, lines, flags) -> dict:
    """The official scoring of the prediction lines (reference_benchmarks.py)."""
    data = flags["data"].split(",")
    if task == "gqa":
        questions = {k: v for k, v in _load(data[0]).items() if k in {x["id"] for x in lines}}
        return ref.gqa_scores(questions, [{"question_id": x["id"], "text": x["prediction"]} for x in lines])
    if task == "textvqa":
        return {
            "accuracy": ref.textvqa_accuracy(
                [{"pred_answer": x["prediction"], "gt_answers": x["answers"]} for x in lines]
            )
        }
    if task in ("vizwiz", "okvqa"):
        if task == "okvqa":  # the raw answer, vqaEval's rule (the EvalAI processor is idempotent on it)
            lines = [dict(x, prediction=ref.EvalAIAnswerProcessor()(x["prediction"])) for x in lines]
        overall, per_type = ref.vizwiz_accuracy(
            [(x["prediction"], x["answers"], x["answer_type"]) for x in lines]
        )
        rows = {"accuracy": overall}
        return rows | (
            {f"accuracy/{k.replace('/', '_')}": v for k, v in per_type.items()} if task == "vizwiz" else {}
        )
    if task == "scienceqa":
        problems = {k: v for k, v in _load(data[0]).items() if k in {x["id"] for x in lines}}
        hits = ref.scienceqa_correct(
            problems, {x["id"]: x.get("generated", x["prediction"]).strip() for x in lines}
        )
        rows = {"accuracy": float(np.mean(list(hits.values())))}
        for key in ("subject", "grade"):
            for value in {x[key] for x in lines}:
                rows[f"accuracy/{value}"] = float(np.mean([hits[x["id"]] for x in lines if x[key] == value]))
        for value in (True, False):
            mine = [hits[x["id"]] for x in lines if x["has_context"] == value]
            if mine:
                rows[f"accuracy/{'has_context' if value else 'no_context'}"] = float(np.mean(mine))
        return rows
    if task == "pope":
        per = {}
        for split in {x["split"] for x in lines}:
            mine = [x for x in lines if x["split"] == split]
            per[split] = reference_pope_eval.eval_pope(
                [x["prediction"] for x in mine], [x["label"] for x in mine]
            )
        rows = {k: float(np.mean([m[k] for m in per.values()])) for k in next(iter(per.values()))}
        return rows | {f"{s}/{k}": v for s, m in per.items() for k, v in m.items()}
    if task == "mme":
        rows, totals = {}, {"perception": 0.0, "cognition": 0.0}
        for sub in {x["subtask"] for x in lines}:
            result = [
                f"{x['image']}\t{x['prompt']}\t{x['answer']}\t{x['prediction']}"
                for x in lines
                if x["subtask"] == sub
            ]
            acc, acc_plus, score = ref.mme_task_score(result)
            rows |= {sub.lower(): score, f"{sub.lower()}/acc": acc, f"{sub.lower()}/acc_plus": acc_plus}
            totals["perception" if sub in mme.PERCEPTION else "cognition"] += score
        return totals | rows
    if task == "mmbench":
        rows = [
            (x["group"], x["prediction"], dict(zip(x["letters"], x["options"], strict=True)), x["answer"])
            for x in lines
        ]
        out = {"circular_accuracy": ref.mmbench_circular(rows)}
        for category in {x["category"] for x in lines}:
            out[f"circular_accuracy/{category}"] = ref.mmbench_circular(
                [r for r, x in zip(rows, lines, strict=True) if x["category"] == category]
            )
        first = [x for x in lines if x["round"] == 0]
        return out | {
            "accuracy": ref.mmbench_circular(
                [
                    (
                        x["group"],
                        x["prediction"],
                        dict(zip(x["letters"], x["options"], strict=True)),
                        x["answer"],
                    )
                    for x in first
                ]
            )
        }
    if task == "seed":
        questions = [q for q in _load(data[0])["questions"] if "choice_a" in q]
        per, total = ref.seed_scores(
            questions, [{"question_id": x["id"], "text": x["prediction"]} for x in lines]
        )
        names = {1: "scene_understanding", 4: "instance_counting"}
        return {"accuracy": total} | {f"accuracy/{names[t]}": v for t, v in per.items()}
    raise AssertionError(task)


@pytest.mark.parametrize("task", list(RUNS))
def test_benchmark_cli_scores_as_the_official_script(task, benchmark_cli):
    (result, lines, submission), files = benchmark_cli["runs"][task], benchmark_cli["files"]
    flags, num_examples, skipped = files[task]
    assert (result["task"], result["num_examples"], result["skipped"]) == (task, num_examples, skipped)
    metrics = {k: v for k, v in result.items() if k not in ("task", "model", "num_examples", "skipped")}
    assert metrics == pytest.approx(official(task, lines, flags), abs=1e-9)
    assert all(x["prompt"].startswith("USER: <image>\n") for x in lines)
    if "--mc=loglik" in RUNS[task]:  # the answer is the option with the best mean log-probability
        assert all(x["prediction"] == x["letters"][int(np.argmax(x["loglik"]))] for x in lines)
    if task in ("gqa", "textvqa", "vizwiz", "okvqa", "seed", "mmbench"):
        assert submission is not None
    if task == "textvqa":  # the OCR file's tokens, as LLaVA-1.5's TextVQA questions carry them
        assert "?\nReference OCR token: dakota, digital\nAnswer" in lines[0]["prompt"]
        assert "Reference OCR token" not in lines[1]["prompt"]
    if task == "seed":  # the leaderboard's JSON lines
        rows = [json.loads(r) for r in submission.decode().splitlines()]
        assert rows == [{"question_id": x["id"], "prediction": x["prediction"]} for x in lines]
    if task == "vizwiz":
        assert [r["image"] for r in json.loads(submission)] == [
            "VizWiz_val_00000000.jpg",
            "VizWiz_val_00000001.jpg",
        ]
    if task == "mmbench":  # every rotation asked: 3 + 2 items for 2 questions
        assert [(x["id"], x["round"]) for x in lines] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
        sheet = read_xlsx(submission)  # the server's Excel sheet: one row per question, round 0's answer
        assert sheet[0] == ["index", "question", "A", "B", "C", "prediction", "answer"]
        first = [x for x in lines if x["round"] == 0]
        assert sheet[1:] == [
            [
                str(x["id"]),
                x["raw_question"],
                *x["options"],
                *[""] * (3 - len(x["options"])),
                x["prediction"],
                x["answer"],
            ]
            for x in first
        ]


def test_loglik_equals_transformers(benchmark_cli):
    """``--mc=loglik`` (on a 1-device mesh, 8 option rows in batches of 3) scores each option as
    transformers' LlavaForConditionalGeneration does: the mean log-probability of the option's tokens."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = benchmark_cli["model"]
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    _, lines, _ = benchmark_cli["runs"]["seed"]
    for line in lines:
        image = Image.open(line["image"]).convert("RGB")
        prompt_ids = processor(text=line["prompt"], images=image, return_tensors="pt")["input_ids"][
            0
        ].tolist()
        expected = []
        for letter in line["letters"]:
            inputs = processor(text=f"{line['prompt']} {letter}", images=image, return_tensors="pt")
            ids = inputs["input_ids"][0].tolist()
            start = next(i for i, (a, b) in enumerate(zip(prompt_ids + [None], ids, strict=False)) if a != b)
            with torch.no_grad():
                logp = torch.log_softmax(model(**inputs).logits[0].double(), -1)
            expected.append(float(np.mean([logp[t - 1, ids[t]].item() for t in range(start, len(ids))])))
        np.testing.assert_allclose(line["loglik"], expected, atol=2e-4)
        assert len(set(np.round(expected, 6))) == len(expected)  # the letters are distinct tokens


def test_bad_layouts_and_flags_are_one_line_errors(benchmark_cli, tmp_path):
    for key, needle in (("layout", "not the expected layout"), ("mc", "not a multiple-choice task")):
        r = benchmark_cli["errors"][key]
        assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and needle in r.stderr
    files = benchmark_cli["files"]
    wrong = {"gqa": "textvqa", "textvqa": "gqa", "scienceqa": "seed", "pope": "gqa", "mme": "gqa",
             "mmbench": "gqa", "seed": "vizwiz", "vizwiz": "seed", "okvqa": "seed"}  # fmt: skip
    for task, other in wrong.items():
        with pytest.raises(UsageError, match="not the expected layout|no usable examples") as e:
            run.load_task_data(task, files[other][0]["data"].split(",")[:1], files[task][0].get("image_root"))
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        run.load_task_data("seed", str(tmp_path / "absent.json"))
    limited = run.load_task_data("pope", files["pope"][0]["data"], files["pope"][0]["image_root"], limit=2)
    assert len(limited) == 2
    only = run.load_task_data(
        "pope", files["pope"][0]["data"], files["pope"][0]["image_root"], split="adversarial"
    )
    assert {r["split"] for r in only} == {"adversarial"} and len(only) == 2
