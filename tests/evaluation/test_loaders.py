"""Standard-format loaders on small files written here: COCO captions, VQAv2, referring-expression JSONL."""

from __future__ import annotations

import collections
import json
import os

import pytest

from mllm_jax.evaluation import loaders


def _write(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def _touch(directory, *names) -> str:
    os.makedirs(directory, exist_ok=True)
    for name in names:
        open(os.path.join(directory, name), "wb").close()
    return str(directory)


def test_coco_captions_group_by_image(tmp_path):
    images = _touch(tmp_path / "val2014", "a.jpg", "b.jpg", "c.jpg")
    ann = _write(
        tmp_path / "captions.json",
        {
            "images": [
                {"id": 7, "file_name": "b.jpg"},
                {"id": 3, "file_name": "a.jpg"},
                {"id": 9, "file_name": "c.jpg"},  # no captions: left out
            ],
            "annotations": [
                {"id": 1, "image_id": 3, "caption": "A dog."},
                {"id": 2, "image_id": 7, "caption": "A cat on a mat"},
                {"id": 3, "image_id": 3, "caption": "a brown dog running"},
            ],
        },
    )
    records = loaders.load_coco_captions(ann, images)
    assert records == [
        {"image_id": 7, "image": os.path.join(images, "b.jpg"), "captions": ["A cat on a mat"]},
        {
            "image_id": 3,
            "image": os.path.join(images, "a.jpg"),
            "captions": ["A dog.", "a brown dog running"],
        },
    ]


def test_coco_captions_errors_name_the_file(tmp_path):
    images = _touch(tmp_path / "img", "a.jpg")
    ann = {"images": [{"id": 1, "file_name": "gone.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    path = _write(tmp_path / "captions.json", ann)
    with pytest.raises(FileNotFoundError, match=r"captions\.json: image not found: .*gone\.jpg"):
        loaders.load_coco_captions(path, images)
    skipped = collections.Counter()
    assert loaders.load_coco_captions(path, images, skipped=skipped) == [] and skipped["missing_image"] == 1

    ann["annotations"].append({"image_id": 5, "caption": "orphan"})
    with pytest.raises(ValueError, match=r"captions\.json: captions for image_id 5"):
        loaders.load_coco_captions(_write(tmp_path / "captions.json", ann), images)
    with pytest.raises(ValueError, match=r"bad\.json: annotations\[0\]: missing key 'caption'"):
        loaders.load_coco_captions(
            _write(tmp_path / "bad.json", {"images": [], "annotations": [{"image_id": 1}]}), images
        )
    ann = {"images": [{"id": 1, "file_name": "../a.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    with pytest.raises(ValueError, match=r"esc\.json: .*escapes the image root"):
        loaders.load_coco_captions(_write(tmp_path / "esc.json", ann), images)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        loaders.load_coco_captions(str(tmp_path / "nope.json"), images)


def _vqa_files(tmp_path, subtype="val2014"):
    questions = {
        "data_subtype": subtype,
        "questions": [
            {"question_id": 4200, "image_id": 42, "question": "How many dogs?"},
            {"question_id": 4201, "image_id": 42, "question": "What color is the dog?"},
            {"question_id": 700, "image_id": 7, "question": "Is it raining?"},
        ],
    }
    answers = lambda *a: [
        {"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a)
    ]
    annotations = {
        "annotations": [
            {
                "question_id": qid,
                "image_id": img,
                "question_type": qt,
                "answer_type": at,
                "multiple_choice_answer": ans[0],
                "answers": answers(*ans),
            }
            for qid, img, qt, at, ans in (
                (700, 7, "is it", "yes/no", ["no"] * 10),
                (4200, 42, "how many", "number", ["2"] * 8 + ["two", "3"]),
                (4201, 42, "what color is the", "other", ["brown"] * 6 + ["tan"] * 4),
            )
        ]
    }
    return _write(tmp_path / "q.json", questions), _write(tmp_path / "a.json", annotations)


def test_vqav2_questions_with_annotations(tmp_path):
    q, a = _vqa_files(tmp_path)
    images = _touch(tmp_path / "val2014", "COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg")
    records = loaders.load_vqav2(q, images, a)
    assert [r["question_id"] for r in records] == [4200, 4201, 700]
    first = records[0]
    assert first["image"] == os.path.join(images, "COCO_val2014_000000000042.jpg")
    assert first["question"] == "How many dogs?" and first["answers"] == ["2"] * 8 + ["two", "3"]
    assert (first["answer_type"], first["question_type"], first["multiple_choice_answer"]) == (
        "number",
        "how many",
        "2",
    )
    assert all(len(r["answers"]) == 10 for r in records)


def test_vqav2_test_dev_without_annotations_uses_test2015_images(tmp_path):
    q, _ = _vqa_files(tmp_path, subtype="test-dev2015")
    images = _touch(tmp_path / "test2015", "COCO_test2015_000000000042.jpg")
    with pytest.raises(
        FileNotFoundError, match=r"q\.json: image not found: .*COCO_test2015_000000000007\.jpg"
    ):
        loaders.load_vqav2(q, images)
    skipped = collections.Counter()
    records = loaders.load_vqav2(q, images, skipped=skipped)
    assert [r["question_id"] for r in records] == [4200, 4201] and skipped == {"missing_image": 1}
    assert "answers" not in records[0]


def test_vqav2_question_without_annotation(tmp_path):
    q, _ = _vqa_files(tmp_path)
    a = _write(tmp_path / "few.json", {"annotations": []})
    with pytest.raises(ValueError, match=r"few\.json: no annotation for question_id 4200"):
        loaders.load_vqav2(q, str(tmp_path), a)


def _jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_referring_jsonl_converts_xywh_to_corners(tmp_path):
    images = _touch(tmp_path / "train2014", "a.jpg", "b.jpg")
    path = _jsonl(
        tmp_path / "refcoco.jsonl",
        [
            {
                "image": "a.jpg",
                "expression": "man on the left",
                "box": [10, 20, 30, 40],
                "split": "val",
                "ref_id": 3,
            },
            "",
            {"image": "b.jpg", "expression": "the red car", "box": [0.5, 1.5, 2, 3], "split": "testA"},
        ],
    )
    records = loaders.load_referring(path, images)
    assert records[0] == {
        "image": os.path.join(images, "a.jpg"),
        "expression": "man on the left",
        "box_xyxy": [10.0, 20.0, 40.0, 60.0],
        "split": "val",
        "ref_id": 3,
    }
    assert records[1]["box_xyxy"] == [0.5, 1.5, 2.5, 4.5]
    assert [r["expression"] for r in loaders.load_referring(path, images, split="testA")] == ["the red car"]


@pytest.mark.parametrize(
    "line, error",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"image": "a.jpg", "box": [0, 0, 1, 1]}', r"bad\.jsonl:2: missing key 'expression'"),
        ('{"image": "a.jpg", "expression": "x", "box": [0, 0, 1]}', r"bad\.jsonl:2: 'box' must be 4 numbers"),
        ('{"image": "a.jpg", "expression": "x", "box": [0, 0, 0, 1]}', r"bad\.jsonl:2: .*w > 0 and h > 0"),
        (
            '{"image": "/etc/passwd", "expression": "x", "box": [0, 0, 1, 1]}',
            r"bad\.jsonl: .*must be relative",
        ),
    ],
)
def test_referring_jsonl_errors_name_file_and_line(tmp_path, line, error):
    images = _touch(tmp_path / "img", "a.jpg")
    path = _jsonl(
        tmp_path / "bad.jsonl", ['{"image": "a.jpg", "expression": "ok", "box": [0, 0, 1, 1]}', line]
    )
    with pytest.raises(ValueError, match=error):
        loaders.load_referring(path, images)


def test_referring_missing_image(tmp_path):
    images = _touch(tmp_path / "img", "a.jpg")
    path = _jsonl(tmp_path / "r.jsonl", [{"image": "b.jpg", "expression": "x", "box": [0, 0, 1, 1]}])
    with pytest.raises(FileNotFoundError, match=r"r\.jsonl: image not found: .*b\.jpg"):
        loaders.load_referring(path, images)
    skipped = collections.Counter()
    assert loaders.load_referring(path, images, skipped=skipped) == [] and skipped["missing_image"] == 1
