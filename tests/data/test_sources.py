"""Record sources: synthetic tasks, LLaVA JSON / JSONL conversion, webdataset tar shards."""

from __future__ import annotations

import collections
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data.sources import LlavaJsonSource, SyntheticSource
from mllm_jax.data.synthetic import QUESTION_TYPES, SyntheticConfig, make_example
from mllm_jax.data.webdataset import WebDatasetSource, expand_braces, list_shards

LLAVA_RECORDS = [
    {
        "id": "000000033471",
        "image": "coco/train2017/000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"id": "noplaceholder", "image": "a.jpg", "conversations": [{"from": "human", "value": "Describe."}]},
    {"id": "last", "image": "b.jpg", "conversations": [{"from": "human", "value": "Describe.\n<image>"}]},
    {"id": "escape", "image": "../../etc/passwd", "conversations": []},
    {"id": "gpt_first", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
    {"id": "bad_role", "conversations": [{"from": "robot", "value": "x"}]},
    {"id": "no_conversations"},
]


def test_synthetic_caption_and_vqa():
    config = SyntheticConfig()
    caption = SyntheticSource(config, "train", "caption", size=10)
    assert len(caption) == 10
    ex = make_example(config, "train", 3)
    record = caption[3]
    assert record["turns"] == [("user", "<image>"), ("assistant", ex["caption"])]
    np.testing.assert_array_equal(record["images"][0], ex["image"])
    assert record["images"][0].dtype == np.uint8

    vqa = SyntheticSource(config, "train", "vqa", size=400)
    types = collections.Counter()
    for i in range(len(vqa)):
        (role, question), (_, answer) = vqa[i]["turns"]
        assert role == "user" and question.startswith("<image> ") and question.endswith("?")
        match = [q for q in make_example(config, "train", i)["questions"] if q["question"] in question]
        assert match and match[0]["answer"] == answer
        types[match[0]["type"]] += 1
    # Types rotate with the index; "position" is the rarest since a lone shape has no such question.
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) > 0.1 * len(vqa)
    assert vqa[7]["turns"] == SyntheticSource(config, "train", "vqa", size=400)[7]["turns"]
    with pytest.raises(ValueError, match="task"):
        SyntheticSource(config, task="detect")


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_json(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(LLAVA_RECORDS, indent=1))
    else:
        path.write_text("\n".join(json.dumps(r) for r in LLAVA_RECORDS) + "\n")
    src = LlavaJsonSource(str(path), str(tmp_path / "images"))
    assert len(src) == len(LLAVA_RECORDS)

    first = src[0]
    assert first["images"] == [str(tmp_path / "images" / "coco" / "train2017" / "000000033471.jpg")]
    assert first["id"] == "000000033471"
    assert first["turns"] == [
        ("user", "<image>\nWhat are the colors of the bus in the image?"),
        ("assistant", "The bus in the image is white and red."),
        ("user", "What feature can be seen on the back of the bus?"),
        ("assistant", "The back of the bus features an advertisement."),
    ]
    where = f"{path}[1]" if fmt == "json" else f"{path}:2"  # file[index] for a list, file:line for JSONL
    assert src[1] == {
        "images": [],
        "turns": [("user", "Hi"), ("assistant", "Hello")],
        "id": "text",
        "where": where,
    }
    assert src[2]["turns"] == [("user", "<image>\nDescribe.")]  # placeholder added as LLaVA does
    assert src[3]["turns"] == [("user", "<image>\nDescribe.")]  # moved to the front, as LLaVA does
    assert src[4]["error"] == "unsafe_path"
    assert src[5]["turns"] == [("user", "y")]  # a leading assistant turn is dropped
    assert src[6]["error"] == "bad_turns"
    assert src[7]["error"] == "no_conversations"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, keys: list[str], skip_caption: str = "") -> None:
    """An img2dataset-style shard: KEY.jpg, KEY.txt, KEY.json per sample."""
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            buf = io.BytesIO()
            Image.fromarray(np.full((6, 8, 3), 10 * i, np.uint8)).save(buf, "PNG")
            _tar_member(tar, f"{key}.png", buf.getvalue())
            if key != skip_caption:
                _tar_member(tar, f"{key}.txt", f"caption {key}".encode())
            _tar_member(tar, f"{key}.json", json.dumps({"key": key}).encode())


def test_webdataset(tmp_path):
    write_shard(tmp_path / "00001.tar", ["c", "d"], skip_caption="d")
    write_shard(tmp_path / "00000.tar", ["a", "b"])
    src = WebDatasetSource(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in src.shards] == ["00000.tar", "00001.tar"]  # sorted
    records = list(src)
    assert [r.get("key") for r in records] == ["a", "b", "c", "d"]
    assert records[1]["turns"] == [("user", "<image>"), ("assistant", "caption b")]
    image = Image.open(io.BytesIO(records[1]["images"][0]))
    assert image.size == (8, 6) and np.asarray(image)[0, 0, 0] == 10
    assert records[3]["error"] == "missing_caption"
    resumed = list(WebDatasetSource.iter_shard(src.shards[0], skip=1))
    assert [r["key"] for r in resumed] == ["b"]

    assert list_shards(str(tmp_path / "0000{0..1}.tar")) == src.shards
    assert list_shards(str(tmp_path / "*.tar")) == src.shards
    with pytest.raises(ValueError, match="no .tar"):
        WebDatasetSource(str(tmp_path / "nothing"))


def test_webdataset_truncated_shard_ends_with_an_error_record(tmp_path):
    write_shard(tmp_path / "full.tar", ["a", "b", "c"])
    data = (tmp_path / "full.tar").read_bytes()
    # Cut inside b's image (512-byte blocks: a = 3 headers + 3 data blocks, then b.png's header).
    (tmp_path / "cut.tar").write_bytes(data[: 6 * 512 + 512 + 10])
    records = list(WebDatasetSource.iter_shard(str(tmp_path / "cut.tar")))
    assert [r.get("key") for r in records[:-1]] == ["a"] and records[-1]["error"] == "bad_shard"


def test_expand_braces():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{8..10}-{0..1}") == ["8-0", "8-1", "9-0", "9-1", "10-0", "10-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
