"""Tiny fixtures of the benchmarks in their released file layouts (a few records each, tiny random
images, one malformed record or missing image where the format allows): ``write_all(root)`` ->
``{task: (flags, num_examples, skipped)}`` for ``python -m mllm_jax.evaluate``."""

from __future__ import annotations

import base64
import io
import json
import os

import hf_fixtures

SIZE = (20, 24)


def _image(path: str, seed: int):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    hf_fixtures.random_image(seed, SIZE).save(path)


def _json(path: str, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f)


def gqa(root):
    for i in range(2):
        _image(f"{root}/images/n{i}.jpg", i)
    types = lambda s, m: {"structural": s, "semantic": m, "detailed": "x"}  # noqa: E731
    questions = {
        "201": {
            "imageId": "n0",
            "question": "Is the sky blue?",
            "answer": "yes",
            "types": types("verify", "attr"),
            "isBalanced": True,
        },
        "202": {
            "imageId": "n1",
            "question": "What is on the table?",
            "answer": "cup",
            "types": types("query", "rel"),
            "isBalanced": True,
        },
        "203": {
            "imageId": "n1",
            "question": "Which color is it?",
            "answer": "red",
            "types": types("choose", "attr"),
            "isBalanced": False,
        },  # not balanced: left out
        "204": {
            "imageId": "n0",
            "answer": "no",
            "types": types("verify", "obj"),
            "isBalanced": True,
        },  # malformed
    }
    _json(f"{root}/testdev_balanced_questions.json", questions)
    return {"data": f"{root}/testdev_balanced_questions.json", "image_root": f"{root}/images"}, 2, 1


def textvqa(root):
    _image(f"{root}/train_images/003a8ae2ef43b901.jpg", 2)
    _image(f"{root}/train_images/00b5e1f1c4b8a4a4.jpg", 3)
    data = [
        {
            "question_id": 34602,
            "question": "what is the brand of this camera?",
            "image_id": "003a8ae2ef43b901",
            "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital"] + ["dakota"] * 6,
        },
        {
            "question_id": 34603,
            "question": "what does the small white text spell?",
            "image_id": "00b5e1f1c4b8a4a4",
            "answers": ["copenhagen"] * 8 + ["thursday", "copenhagen."],
        },
        {
            "question_id": 34604,
            "question": "what time is it?",
            "image_id": "missing0000",
            "answers": ["10:10"] * 10,
        },  # no such image: skipped
    ]
    _json(
        f"{root}/TextVQA_0.5.1_val.json",
        {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
    )
    ocr = {"data": [{"image_id": "003a8ae2ef43b901", "ocr_tokens": ["dakota", "digital"]}]}
    _json(f"{root}/TextVQA_Rosetta_OCR_v0.2_val.json", ocr)  # the second image has no OCR tokens
    data = f"{root}/TextVQA_0.5.1_val.json,{root}/TextVQA_Rosetta_OCR_v0.2_val.json"
    return {"data": data, "image_root": f"{root}/train_images"}, 2, 1


def scienceqa(root):
    problems = {
        "5": {
            "question": "Which animal's feet are also adapted for grabbing prey?",
            "choices": ["bald eagle", "bat"],
            "answer": 0,
            "hint": "Ospreys have talons.",
            "image": "image.png",
            "subject": "natural science",
            "grade": "grade4",
            "split": "test",
        },
        "8": {
            "question": "Which word would you find on a dictionary page?",
            "choices": ["rug", "rose", "rock"],
            "answer": 2,
            "hint": "",
            "image": "image.png",
            "subject": "language science",
            "grade": "grade8",
            "split": "test",
        },
        "9": {
            "question": "What is the capital of Utah?",
            "choices": ["Salt Lake City", "Provo"],
            "answer": 0,
            "hint": "",
            "image": None,
            "subject": "social science",
            "grade": "grade3",
            "split": "test",
        },
        "12": {
            "question": "Which is a solid?",
            "choices": ["milk"],
            "answer": 3,
            "hint": "",
            "image": "image.png",
            "subject": "natural science",
            "grade": "grade2",
            "split": "test",
        },
        "20": {
            "question": "Which is smoother?",
            "choices": ["rock", "silk"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "subject": "natural science",
            "grade": "grade1",
            "split": "val",
        },
    }
    for pid in ("5", "8", "12"):
        _image(f"{root}/images/test/{pid}/image.png", int(pid))
    _json(f"{root}/problems.json", problems)
    _json(f"{root}/pid_splits.json", {"test": ["5", "8", "9", "12"], "val": ["20"]})
    # 9 has no image (not in the IMG subset), 12 is malformed (answer out of range)
    return {"data": f"{root}/problems.json,{root}/pid_splits.json", "image_root": f"{root}/images"}, 2, 1


def pope(root):
    os.makedirs(root, exist_ok=True)
    for i in range(2):
        _image(f"{root}/val2014/COCO_val2014_{i:012d}.jpg", 10 + i)
    rows = {
        "random": [("bench", "yes", 0), ("zebra", "no", 0), ("car", "yes", 1)],
        "adversarial": [("fork", "no", 1), ("dog", "yes", 1)],
    }
    for split, qs in rows.items():
        with open(f"{root}/coco_pope_{split}.json", "w") as f:
            for k, (obj, label, img) in enumerate(qs):
                line = {
                    "question_id": k + 1,
                    "image": f"COCO_val2014_{img:012d}.jpg",
                    "text": f"Is there a {obj} in the image?",
                    "label": label,
                }
                f.write(json.dumps(line) + "\n")
            if split == "adversarial":
                f.write("{not json\n")  # malformed: skipped
    files = ",".join(f"{root}/coco_pope_{s}.json" for s in rows)
    return {"data": files, "image_root": f"{root}/val2014"}, 5, 1


def mme(root):
    base = f"{root}/MME_Benchmark_release_version"
    _image(f"{base}/existence/000000006040.jpg", 20)
    _image(f"{base}/artwork/images/10002.jpg", 21)
    _image(f"{base}/code_reasoning/0020.png", 22)
    yn = " Please answer yes or no."
    texts = {
        f"{base}/existence/000000006040.txt": f"Is there a train in this image?{yn}\tYes\n"
        f"Is there a bed in this image?{yn}\tNo\n",
        f"{base}/artwork/questions_answers_YN/10002.txt": f"Is this artwork a painting?{yn}\tYes\n"
        f"Is this artwork glassware?{yn}\tNo\n",
        f"{base}/code_reasoning/0020.txt": "The output of the code is 6. Please answer yes or no.\tNo\n"
        "The output of the code is 5. Please answer yes or no.\tYes\nno tab on this line\n",  # malformed
    }
    for path, text in texts.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return {"data": base}, 6, 1


def _b64(seed: int) -> str:
    out = io.BytesIO()
    hf_fixtures.random_image(seed, SIZE).save(out, format="JPEG")
    return base64.b64encode(out.getvalue()).decode()


def mmbench(root):
    os.makedirs(root, exist_ok=True)
    header = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "image",
        "source",
        "l2-category",
        "comment",
        "split",
    ]
    rows = [
        [
            0,
            "What is the main color?",
            "nan",
            "red",
            "green",
            "blue",
            "",
            "C",
            "color_recognition",
            _b64(30),
            "x",
            "attribute",
            "nan",
            "dev",
        ],
        [
            1,
            "Which mood does the image show?",
            "The picture is a painting.",
            "happy",
            "sad",
            "",
            "",
            "A",
            "image_emotion",
            _b64(31),
            "x",
            "attribute",
            "nan",
            "dev",
        ],
        [
            2,
            "How many?",
            "nan",
            "one",
            "",
            "",
            "",
            "A",
            "counting",
            _b64(32),
            "x",
            "y",
            "nan",
            "dev",
        ],  # 1 option
    ]
    with open(f"{root}/mmbench_dev_20230712.tsv", "w") as f:
        f.write("\t".join(header) + "\n")
        f.writelines("\t".join(map(str, r)) + "\n" for r in rows)
    return {"data": f"{root}/mmbench_dev_20230712.tsv"}, 2, 1


def seed(root):
    for i in range(2):
        _image(f"{root}/SEED-Bench-image/{1454426 + i}_2591111986.jpg", 40 + i)
    q = lambda qid, img, t, ans, kind="image": {  # noqa: E731
        "question_id": qid,
        "question": "How many towels are in the image?",
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "answer": ans,
        "data_id": f"{1454426 + img}_2591111986.jpg",
        "data_type": kind,
        "question_type_id": t,
    }
    data = {
        "question_type": {"Scene Understanding": 1, "Instance Counting": 4, "Action Recognition": 11},
        "questions": [
            q("101669", 0, 1, "A"),
            q("101670", 1, 4, "D"),
            q("9001", 0, 11, "B", "video"),
            {"question_id": "101671", "data_type": "image"},
        ],  # video: left out; last one malformed
    }
    _json(f"{root}/SEED-Bench.json", data)
    return {"data": f"{root}/SEED-Bench.json", "image_root": f"{root}/SEED-Bench-image"}, 2, 1


def vizwiz(root):
    for i in range(2):
        _image(f"{root}/val/VizWiz_val_{i:08d}.jpg", 50 + i)
    answers = lambda xs: [{"answer": a, "answer_confidence": "yes"} for a in xs]  # noqa: E731
    data = [
        {
            "image": "VizWiz_val_00000000.jpg",
            "question": "What is this?",
            "answerable": 0,
            "answers": answers(["unanswerable"] * 7 + ["unsuitable"] * 3),
            "answer_type": "unanswerable",
        },
        {
            "image": "VizWiz_val_00000001.jpg",
            "question": "What color is this shirt?",
            "answerable": 1,
            "answers": answers(["blue"] * 5 + ["navy blue"] * 3 + ["dark blue", "blue."]),
            "answer_type": "other",
        },
        {"image": "VizWiz_val_00000002.jpg", "question": "Is it on?", "answers": "yes"},  # malformed
    ]
    _json(f"{root}/val.json", data)
    return {"data": f"{root}/val.json", "image_root": f"{root}/val"}, 2, 1


def okvqa(root):
    for i in range(2):
        _image(f"{root}/val2014/COCO_val2014_{297147 + i:012d}.jpg", 60 + i)
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475},
            {"image_id": 297148, "question": "Name the type of plant this is?", "question_id": 2971485},
        ],
    }
    annotations = {
        "annotations": [
            {
                "question_id": 2971475,
                "image_id": 297147,
                "answer_type": "other",
                "question_type": "one",
                "answers": [
                    {"answer": a, "answer_id": i + 1} for i, a in enumerate(["race"] * 4 + ["racing"] * 6)
                ],
            },
            {
                "question_id": 2971485,
                "image_id": 297148,
                "answer_type": "other",
                "question_type": "eight",
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["cactus"] * 10)],
            },
        ]
    }
    _json(f"{root}/OpenEnded_mscoco_val2014_questions.json", questions)
    _json(f"{root}/mscoco_val2014_annotations.json", annotations)
    data = f"{root}/OpenEnded_mscoco_val2014_questions.json,{root}/mscoco_val2014_annotations.json"
    return {"data": data, "image_root": f"{root}/val2014"}, 2, 0


WRITERS = {f.__name__: f for f in (gqa, textvqa, scienceqa, pope, mme, mmbench, seed, vizwiz, okvqa)}


def write_all(root: str) -> dict:
    return {task: write(os.path.join(root, task)) for task, write in WRITERS.items()}
