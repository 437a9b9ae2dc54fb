"""`python -m mllm_jax.evaluate` on a tiny random LLaVA and tiny COCO / VQAv2 / RefCOCO files, and on a
grounding run (a background job, tests/jobs.py).

A random model scores ~0: these tests check the plumbing (the predictions are `predict`'s greedy
outputs, the printed metrics are `mllm_jax.evaluation.metrics` of the predictions file), not quality.
"""

import json
import os
import re

import hf_fixtures
import jobs
import numpy as np
import pytest
from commands import main_cmd
from PIL import Image

from mllm_jax import errors, predict
from mllm_jax.data import boxes
from mllm_jax.evaluation import decoder, file_task, metrics, run, synthetic_vqa
from mllm_jax.families import Inputs

MAX_NEW = 6
PROMPTS = {
    "coco_captions": "USER : <image> describe this picture . ASSISTANT :",
    "vqav2": "USER : <image> {question} ASSISTANT :",
    "refcoco": "USER : <image> where is {expression} ? ASSISTANT :",
}
SIZES = ((20, 24), (32, 16), (16, 16))
HEADLINE = synthetic_vqa.HEADLINE_TYPES


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0].strip()


def greedy(model_dir, prompt, image) -> str:
    return predict.predict(model_dir, prompt, [image], max_new_tokens=MAX_NEW)["text"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, llava_dir):
    """Three images and each task's files in the standard formats, with references built around the
    model's own greedy outputs so the metrics are not all 0: ``{task: (flags, {id: predict's text})}``."""
    model_dir = llava_dir("clip_default")
    root = str(tmp_path_factory.mktemp("eval_data"))
    images = [hf_fixtures.save_image(root, seed, size) for seed, size in enumerate(SIZES)]
    for image_id in range(3):  # VQAv2 names its images after the split and image id
        hf_fixtures.random_image(image_id, SIZES[image_id]).save(f"{root}/COCO_val2014_{image_id:012d}.jpg")

    # COCO: image 7's references include its generated caption (BLEU and CIDEr > 0)
    coco_text = {7 + i: greedy(model_dir, PROMPTS["coco_captions"], im) for i, im in enumerate(images)}
    captions = {
        7: ["a red circle on the left", first_line(coco_text[7])],
        8: ["the blue square"],
        9: ["two shapes"],
    }
    coco = {
        "images": [{"id": 7 + i, "file_name": os.path.basename(im)} for i, im in enumerate(images)],
        "annotations": [
            {"id": 10 * k + j, "image_id": k, "caption": c}
            for k, caps in captions.items()
            for j, c in enumerate(caps)
        ],
    }

    # VQAv2: 10, 2 and 0 of the 10 humans gave the model's answer -> accuracies 1, 0.6, 0
    questions = {
        100: (0, "what color is the circle ?"),
        101: (1, "how many shapes ?"),
        102: (2, "is it red ?"),
    }
    vqa_text = {
        qid: greedy(model_dir, PROMPTS["vqav2"].format(question=q), f"{root}/COCO_val2014_{img:012d}.jpg")
        for qid, (img, q) in questions.items()
    }
    answers = {
        100: ("other", [first_line(vqa_text[100])] * 10),
        101: ("number", [first_line(vqa_text[101])] * 2 + ["zebra"] * 8),
        102: ("yes/no", ["no"] * 10),
    }
    vqa_q = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": qid, "image_id": img, "question": q} for qid, (img, q) in questions.items()
        ],
    }
    vqa_a = {
        "annotations": [
            {
                "question_id": qid,
                "image_id": questions[qid][0],
                "question_type": "what",
                "answer_type": kind,
                "multiple_choice_answer": given[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k} for k, a in enumerate(given)
                ],
            }
            for qid, (kind, given) in answers.items()
        ]
    }

    # RefCOCO-style JSON lines; --split=val leaves the testA line out
    refs = [
        {
            "image": images[0],
            "expression": "the red circle",
            "box": [2, 3, 10, 8],
            "split": "val",
            "ref_id": 5,
        },
        {"image": images[1], "expression": "the square", "box": [0, 0, 16, 16], "split": "testA"},
        {"image": images[1], "expression": "the blue square", "box": [4, 10, 8, 12], "split": "val"},
        {"image": images[2], "expression": "the star", "box": [1, 1, 14, 14], "split": "val", "ref_id": 6},
    ]
    val = [r for r in refs if r["split"] == "val"]
    ref_text = {i: greedy(model_dir, PROMPTS["refcoco"].format(**r), r["image"]) for i, r in enumerate(val)}
    for r in refs:
        r["image"] = os.path.basename(r["image"])

    for name, content in {"captions.json": coco, "questions.json": vqa_q, "annotations.json": vqa_a}.items():
        with open(f"{root}/{name}", "w") as f:
            json.dump(content, f)
    with open(f"{root}/refs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in refs)
    return {
        "coco_captions": ({"data": f"{root}/captions.json"}, coco_text),
        "vqav2": ({"data": f"{root}/questions.json,{root}/annotations.json"}, vqa_text),
        "refcoco": ({"data": f"{root}/refs.jsonl", "split": "val"}, ref_text),
    }


def run_evaluate(*flags, fresh=False):
    """``python -m mllm_jax.evaluate`` (a fork of tests/zygote.py's server unless ``fresh``)."""
    return jobs.python("-m", "mllm_jax.evaluate", *flags, fresh=fresh)


def rescored(task, lines) -> dict:
    """The task's metrics computed from the predictions file with mllm_jax.evaluation.metrics alone."""
    if task == "coco_captions":
        return metrics.caption_scores(
            {line["id"]: line["references"] for line in lines},
            {line["id"]: line["prediction"] for line in lines},
        )
    if task == "vqav2":
        preds, answers = [line["prediction"] for line in lines], [line["answers"] for line in lines]
        rows = {
            "vqa_accuracy": metrics.mean_vqa_accuracy(preds, answers),
            "exact_match": float(
                np.mean([metrics.exact_match(p, a) for p, a in zip(preds, answers, strict=True)])
            ),
        }
        for line in lines:  # one question per answer type in the fixture
            rows[f"vqa_accuracy/{line['answer_type']}"] = metrics.vqa_accuracy(
                line["prediction"], line["answers"]
            )
            rows[f"exact_match/{line['answer_type']}"] = metrics.exact_match(
                line["prediction"], line["answers"]
            )
        return rows
    found = [boxes.tokens_to_box(line["prediction"], line["width"], line["height"]) for line in lines]
    return {
        "grounding_accuracy": metrics.grounding_accuracy(found, [line["target_box"] for line in lines]),
        "parsed_boxes": float(np.mean([b is not None for b in found])),
    }


METRIC_RANGES = {  # task -> {key: (low, high)}
    "coco_captions": {"CIDEr": (0, 10), **{f"BLEU-{n}": (0, 1) for n in range(1, 5)}},
    "vqav2": {
        k + t: (0, 1) for k in ("vqa_accuracy", "exact_match") for t in ("", "/other", "/number", "/yes/no")
    },
    "refcoco": {"grounding_accuracy": (0, 1), "parsed_boxes": (0, 1)},
}
# The CLI is run in a subprocess for vqav2; the others call run.evaluate() in-process, which shares the
# compiled generate across tasks (each subprocess compiles again).
VIA_CLI = {"vqav2"}


@pytest.mark.parametrize("task", ["vqav2", "coco_captions", "refcoco"])
def test_metrics_equal_metrics_of_predictions_of_predict(task, data, llava_dir, tmp_path):
    model_dir = llava_dir("clip_default")
    out = str(tmp_path / "predictions.jsonl")
    args, texts = data[task]
    kwargs = dict(args, prompt=PROMPTS[task], max_new_tokens=MAX_NEW, batch_size=2, predictions=out)
    if task in VIA_CLI:  # 3 examples in batches of 2: the second batch is padded
        flags = [f"--model={model_dir}", f"--task={task}", *[f"--{k}={v}" for k, v in kwargs.items()]]
        r = run_evaluate(*flags, fresh=True)  # in its own interpreter
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)  # stdout holds only the metrics; logs went to stderr
    else:
        result = run.evaluate(model_dir, task, **kwargs)
    assert set(result) == {"task", "model", "num_examples", *METRIC_RANGES[task]}
    assert (result["task"], result["model"], result["num_examples"]) == (task, model_dir, 3)
    for key, (low, high) in METRIC_RANGES[task].items():
        assert low <= result[key] <= high, key
    with open(out) as f:
        lines = [json.loads(line) for line in f]
    assert [line["id"] for line in lines] == list(texts)  # one line per example, in order
    for line in lines:  # batched, padded generation gives predict's greedy text
        assert (line["generated"], line["prediction"]) == (texts[line["id"]], first_line(texts[line["id"]]))
    expected = rescored(task, lines)
    assert set(expected) == set(METRIC_RANGES[task])
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    if task == "vqav2":  # known from how the fixture's answers were made
        assert result["vqa_accuracy"] == pytest.approx((1 + 0.6 + 0) / 3)
        assert result["exact_match"] == pytest.approx(2 / 3)
    if task == "coco_captions":
        assert result["CIDEr"] > 0 and result["BLEU-1"] > 0
    if task == "refcoco":  # the tiny tokenizer has no location tokens: no box, every example a miss
        assert [line.get("ref_id") for line in lines] == [5, None, 6]
        assert [(line["width"], line["height"]) for line in lines] == [(24, 20), (16, 32), (16, 16)]
        assert result["grounding_accuracy"] == 0


def test_synthetic_vqa_on_our_checkpoint(llava_dir, tmp_path):
    from mllm_jax import convert

    ckpt = str(tmp_path / "ckpt")
    convert.import_hf(llava_dir("clip_default"), ckpt)
    out = str(tmp_path / "synthetic.jsonl")
    result = run.evaluate(ckpt, "synthetic_vqa", limit=6, batch_size=3, predictions=out)
    assert result["num_examples"] == 6
    with open(out) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 6
    types = sorted({line["type"] for line in lines})
    assert {"eval/vqa_accuracy", "eval/vqa_accuracy_blank"} | {
        f"eval/vqa_accuracy/{t}" for t in types
    } <= set(result)
    headline = [
        line["prediction"] == line["answers"][0]
        for line in lines
        if line["type"] in synthetic_vqa.HEADLINE_TYPES
    ]
    assert result["eval/vqa_accuracy"] == pytest.approx(np.mean(headline))
    for t in types:
        correct = [line["prediction"] == line["answers"][0] for line in lines if line["type"] == t]
        assert result[f"eval/vqa_accuracy/{t}"] == pytest.approx(np.mean(correct))
    assert all(line["prompt"].startswith("USER : <image>") for line in lines)


def test_boxes_are_parsed_from_location_tokens_and_scored():
    spec = run.TASKS["refcoco"]
    image = Image.new("RGB", (40, 20))
    target = [4.0, 2.0, 20.0, 10.0]
    hit = spec.parse("it is at " + boxes.box_to_tokens(target, 40, 20) + " .", image)
    miss = spec.parse(boxes.box_to_tokens([30, 12, 40, 20], 40, 20), image)
    unparsed = spec.parse("left", image)
    np.testing.assert_allclose(hit["box"], target, atol=40 / 1023)
    assert (hit["width"], hit["height"], unparsed["box"]) == (40, 20, None)
    lines = [dict(p, target_box=target) for p in (hit, miss, unparsed)]
    assert spec.score(lines) == pytest.approx({"grounding_accuracy": 1 / 3, "parsed_boxes": 2 / 3})


def test_templates_and_batch_padding():
    for task in run.TASK_NAMES:
        run.task_template(task, None)  # every default passes its own check
    with pytest.raises(errors.UsageError, match=r"needs a \{question\}"):
        run.task_template("vqav2", "USER : <image> ASSISTANT :")
    with pytest.raises(errors.UsageError, match=r"\{question\} does not apply"):
        run.task_template("refcoco", "<image> {question} {expression}")
    assert file_task.fill("{question} {x}", {"question": "why ?"}, ("question",)) == "why ? {x}"
    inputs = [
        Inputs(None, [1, 2, 3], np.full((1, 1, 4, 4, 3), i, np.float32), {"mask": np.ones((1, n), np.int32)})
        for i, n in ((0, 3), (1, 40))
    ]
    # columns padded to one bucket per batch, then rows to the batch size with copies of the last
    tokens, pixels, kwargs = decoder.pad_rows(3, *file_task.stack_inputs(inputs))
    assert tokens == [[1, 2, 3]] * 3
    assert pixels.shape == (3, 1, 4, 4, 3) and pixels[:, 0, 0, 0, 0].tolist() == [0, 1, 1]
    assert kwargs["mask"].shape == (3, 64) and kwargs["mask"].sum(1).tolist() == [3, 40, 40]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "annotation file not found"),
        ("unknown_task", "unknown; known: coco_captions"),
        ("missing_image", "image not found"),
        ("bad_prompt", r"needs a \{question\} placeholder"),
    ],
)
def test_bad_input_exits_2_with_one_line(case, message, data, llava_dir, tmp_path):
    model = f"--model={llava_dir('clip_default')}"
    broken = tmp_path / "captions.json"
    broken.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "gone.png"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}],
            }
        )
    )
    flags = {
        "missing_data": ["--task=coco_captions", f"--data={tmp_path}/nothing.json"],
        "unknown_task": ["--task=coco", f"--data={data['coco_captions'][0]['data']}"],
        "missing_image": ["--task=coco_captions", f"--data={broken}"],
        "bad_prompt": ["--task=vqav2", f"--data={data['vqav2'][0]['data']}", "--prompt=<image> describe"],
    }[case]
    r = run_evaluate(model, *flags)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ")
    assert re.search(message, r.stderr)


GROUNDING_N = 8  # SMALL's eval batch: the same batches as training's eval


@jobs.fixture
def grounding_run(tmp):
    """A shrunken `tiny_grounding` run through ``python -m mllm_jax.main``, exported with ``python -m
    mllm_jax.convert``: ``(workdir, HF dir)``."""
    workdir, out = str(tmp / "run"), str(tmp / "hf")
    steps = ["--config.stages.align.steps=1", "--config.stages.instruct.steps=2"]
    n = f"--config.eval.num_grounding={GROUNDING_N}"
    jobs.check(jobs.run(main_cmd(workdir, *steps, n, config="configs/llava.py:tiny_grounding")))
    jobs.check(jobs.python("-m", "mllm_jax.convert", f"--from={workdir}", f"--to_hf={out}"))
    return workdir, out


def test_synthetic_grounding_on_a_run_with_location_tokens(grounding_run, tmp_path):
    """A shrunken `tiny_grounding` run: its tokenizer and embeddings hold the location tokens, the HF
    export carries them, and `evaluate --task=synthetic_grounding` reports what training logged."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    workdir, out = grounding_run
    n = GROUNDING_N
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if "eval/grounding_accuracy" in line][-1]

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.convert_tokens_to_ids([boxes.LOCATION_TOKENS[0], boxes.LOCATION_TOKENS[-1]])
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True).split() == ["<loc0000>", "<loc1023>"]
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.vocab_size >= len(tokenizer) > boxes.NUM_BINS

    predictions = str(tmp_path / "grounding.jsonl")
    result = run.evaluate(workdir, "synthetic_grounding", limit=n, batch_size=n, predictions=predictions)
    with open(predictions) as f:
        lines = [json.loads(line) for line in f]
    found = [line for line in lines if line["type"] == "grounding"]
    named = [line for line in lines if line["type"] == "referring"]
    assert (len(found), len(named), result["num_examples"]) == (n, n, n)
    assert all(line["prompt"].startswith("USER : <image> where is the ") for line in found)
    assert all("what is at <loc" in line["prompt"] for line in named)
    assert result["eval/grounding_accuracy"] == pytest.approx(np.mean([line["iou"] >= 0.5 for line in found]))
    assert result["eval/grounding_mean_iou"] == pytest.approx(np.mean([line["iou"] for line in found]))
    assert result["eval/grounding_parsed"] == pytest.approx(
        np.mean([line["box"] is not None for line in found])
    )
    correct = [line["prediction"] == line["answers"][0] for line in named]
    assert result["eval/referring_accuracy"] == pytest.approx(np.mean(correct))
    for key in ("eval/grounding_accuracy", "eval/grounding_mean_iou", "eval/referring_accuracy"):
        assert result[key] == pytest.approx(logged[key]), key
