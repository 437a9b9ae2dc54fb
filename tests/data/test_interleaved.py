"""Interleaved documents: MMC4 JSONL and webdataset samples, the synthetic multi-image tasks, few-shot
prompts in the training format, and how the pipeline encodes documents (skips, caps, truncation)."""

from __future__ import annotations

import base64
import collections
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data.fewshot import fewshot_turns, heldout_questions, support_questions
from mllm_jax.data.layouts import ModelSpec
from mllm_jax.data.pipeline import DataConfig, make_iterator
from mllm_jax.data.sources import Mmc4Source, SyntheticSource
from mllm_jax.data.synthetic import QUESTION_TYPES, SyntheticConfig, make_example, vocabulary
from mllm_jax.data.templates import encode_conversation, encode_prompt
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.data.webdataset import WebDatasetSource

FAKE = "<fake_token_around_image>"
SPEC = ImageSpec(8, mode="resize")
WORDS = ["s0", "s1", "s2", "s3", "s4", "s5"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocabulary(SyntheticConfig()) + WORDS, extra_special=("<image>", FAKE))


def _idefics(tok) -> ModelSpec:
    image, fake = tok.convert_tokens_to_ids(["<image>", FAKE])
    return ModelSpec(image, 4, layout="wrapped", around_token_id=fake)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _mmc4(texts, images) -> dict:
    return {
        "url": "http://example.com",
        "text_list": texts,
        "image_info": [{"image_name": n, "matched_text_index": i, "matched_sim": 0.3} for n, i in images],
    }


def _write_mmc4(tmp_path, docs: list[dict]) -> tuple[str, str]:
    root = tmp_path / "images"
    root.mkdir()
    for v in range(4):
        (root / f"{v}.png").write_bytes(_png(40 * (v + 1)))
    (root / "corrupt.png").write_bytes(b"not a png")
    (tmp_path / "secret.png").write_bytes(_png(255))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return str(path), str(root)


def test_mmc4_source_places_images_before_their_sentence(tmp_path):
    docs = [
        _mmc4(["s0", "s1", "s2"], [("1.png", 2), ("0.png", 0), ("2.png", 2)]),
        _mmc4(["s0"], [("../secret.png", 0), ("/etc/passwd", 0), ("link.png", 0)]),
        {"text_list": ["s0"], "image_info": [{"image_name": "0.png", "matched_text_index": 5}]},
    ]
    path, root = _write_mmc4(tmp_path, docs)
    (tmp_path / "docs.jsonl").write_text((tmp_path / "docs.jsonl").read_text() + "{not json\n")
    src = Mmc4Source(path, root)
    assert len(src) == 4
    first = src[0]
    assert first["where"] == f"{path}:1"
    assert [(k, v if k == "text" else v.rsplit("/", 1)[1]) for k, v in first["document"]] == [
        ("image", "0.png"),
        ("text", "s0"),
        ("text", "s1"),
        ("image", "1.png"),
        ("image", "2.png"),
        ("text", "s2"),
    ]
    unsafe = [v for k, v in src[1]["document"] if k == "image"]
    assert [v["error"] for v in unsafe] == ["unsafe_path"] * 3  # "..", absolute, symlink out of root
    assert src[2]["error"] == "bad_document"  # matched_text_index out of range
    assert src[3] == {"error": "bad_json", "where": f"{path}:4"}


def test_mmc4_pipeline_skips_images_then_documents(tmp_path, tok):
    docs = [
        _mmc4(["s0", "s1", "s2"], [("0.png", 0), ("missing.png", 1), ("1.png", 2)]),  # one image lost
        _mmc4(["s3"], [("corrupt.png", 0), ("../secret.png", 0)]),  # every image fails: skipped
        _mmc4(["s0", "s1", "s2", "s3"], [("0.png", 0), ("1.png", 1), ("2.png", 2), ("3.png", 3)]),  # > max
    ]
    path, root = _write_mmc4(tmp_path, docs)
    data = DataConfig(source="mmc4", path=path, image_root=root, max_length=32, max_images=2, shuffle=False)
    skipped = collections.Counter()
    batch = next(make_iterator(data, tok, SPEC, _idefics(tok), batch_size=2, seed=0, skipped=skipped))
    # Prefetching reads every record several times; the second document fails all three ways at once.
    assert set(skipped) == {"missing_image", "bad_image", "unsafe_path", "no_images"}
    assert skipped["bad_image"] == skipped["unsafe_path"] == skipped["no_images"]
    words = [
        tok.convert_ids_to_tokens(t[: m.sum()].tolist())
        for t, m in zip(batch["tokens"], batch["attention_mask"], strict=True)
    ]
    F, I = FAKE, "<image>"  # noqa: E741
    assert words[0] == ["<s>", F, I, F, "s0", "s1", F, I, F, "s2", "</s>"]
    # Capped at max_images = 2: cut right before the third image, whose sentence is about it.
    assert words[1] == ["<s>", F, I, F, "s0", F, I, F, "s1", "</s>"]
    learned = tok.convert_ids_to_tokens(batch["targets"][0][batch["loss_mask"][0] == 1].tolist())
    assert learned == ["s0", "s1", "s2", "</s>"]  # text only, never an image or fake token
    np.testing.assert_array_equal(batch["images"][0, 0], SPEC(Image.open(io.BytesIO(_png(40)))))
    np.testing.assert_array_equal(batch["images"][0, 1], SPEC(Image.open(io.BytesIO(_png(80)))))


def test_long_document_is_cut_with_its_images(tmp_path, tok):
    docs = [_mmc4(["s0 s1 s2 s3", "s4", "s5"], [("0.png", 0), ("1.png", 1), ("2.png", 2)])]
    path, root = _write_mmc4(tmp_path, docs)
    data = DataConfig(source="mmc4", path=path, image_root=root, max_length=10, max_images=3, shuffle=False)
    llava = ModelSpec(tok.convert_tokens_to_ids("<image>"), 3)
    batch = next(make_iterator(data, tok, SPEC, llava, batch_size=1, seed=0))
    words = tok.convert_ids_to_tokens(batch["tokens"][0].tolist())
    # 1 + 3 + 4 tokens, then only 3 of the second image's block would fit: it is dropped with its block.
    assert words[:8] == ["<s>"] + ["<image>"] * 3 + ["s0", "s1", "s2", "s3"]
    assert words[8:] == ["<pad>"] * 2 and batch["attention_mask"][0].sum() == 8
    assert np.abs(batch["images"][0, 0]).sum() > 0 and (batch["images"][0, 1:] == 0).all()


def _write_interleaved_shard(path, samples: dict[str, tuple[dict, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, (meta, files) in samples.items():
            members = {f"{key}.json": json.dumps(meta).encode()} | {f"{key}.{n}": b for n, b in files.items()}
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_interleaved_and_pairs_share_a_shard(tmp_path):
    inline = {"text_list": ["s0"], "image_info": [{"matched_text_index": 0, "image_base64": ""}]}
    inline["image_info"][0]["image_base64"] = base64.b64encode(_png(9)).decode()
    samples = {
        "a": (
            _mmc4(["s0", "s1"], [("0.png", 1), ("a.1.png", 0), ("9.png", 0)]),
            {"0.png": _png(1), "1.png": _png(2)},
        ),
        "b": ({"caption_meta": 1}, {"png": _png(3), "txt": b"s2"}),  # an img2dataset pair
        "c": (inline, {}),
    }
    _write_interleaved_shard(tmp_path / "00000.tar", samples)
    records = list(WebDatasetSource(str(tmp_path)))
    assert [r["key"] for r in records] == ["a", "b", "c"]
    assert records[0]["where"].endswith("00000.tar:a")
    doc = records[0]["document"]
    assert [k for k, _ in doc] == ["image", "image", "text", "image", "text"]
    assert doc[0][1] == _png(2) and doc[3][1] == _png(1) and doc[1][1]["error"] == "missing_image"
    assert records[1]["turns"] == [("user", "<image>"), ("assistant", "s2")]
    assert records[2]["document"] == [("image", _png(9)), ("text", "s0")]


def test_synthetic_interleaved_tasks():
    config = SyntheticConfig()
    vqa = SyntheticSource(config, "train", "interleaved", size=50, max_images=4)
    counts = collections.Counter()
    for i in range(50):
        record = vqa[i]
        n = len(record["images"])
        counts[n] += 1
        assert len(record["turns"]) == 2 * n
        for k, image in enumerate(record["images"]):
            (role, question), (_, answer) = record["turns"][2 * k : 2 * k + 2]
            assert role == "user" and question.startswith("<image> ") and question.count("<image>") == 1
            # Each answer is about the image right before it.
            ex = make_example(config, "train", i * 4 + k)
            np.testing.assert_array_equal(image, ex["image"])
            assert {"question": question[len("<image> ") :], "answer": answer} in [
                {"question": q["question"], "answer": q["answer"]} for q in ex["questions"]
            ]
    assert set(counts) == {2, 3, 4}  # 2..max_images images
    again = SyntheticSource(config, "train", "interleaved", size=50, max_images=4)[7]
    assert again["turns"] == vqa[7]["turns"]  # a pure function of the index

    docs = SyntheticSource(config, "train", "interleaved_caption", size=10, max_images=3)[2]["document"]
    assert [k for k, _ in docs] == ["image", "text"] * (len(docs) // 2) and 2 <= len(docs) // 2 <= 3
    assert docs[1][1] == make_example(config, "train", 2 * 3)["caption"]
    with pytest.raises(ValueError, match="max_images >= 2"):
        SyntheticSource(config, task="interleaved", max_images=1)


def test_fewshot_prompt_is_the_training_format(tok):
    config = SyntheticConfig()
    supports, query = support_questions(config, 4), heldout_questions(config, 1)[0]
    assert [s["type"] for s in supports] == list(QUESTION_TYPES)
    assert support_questions(config, 4)[2]["question"] == supports[2]["question"]  # deterministic
    turns = fewshot_turns(supports[:2], query)
    assert turns == [
        ("user", f"<image> {supports[0]['question']}"),
        ("assistant", supports[0]["answer"]),
        ("user", f"<image> {supports[1]['question']}"),
        ("assistant", supports[1]["answer"]),
        ("user", f"<image> {query['question']}"),
    ]
    spec = _idefics(tok)
    prompt = encode_prompt("tiny", tok, turns, spec)
    full, _ = encode_conversation("tiny", tok, [*turns, ("assistant", query["answer"])], spec)
    assert full[: len(prompt)].tolist() == prompt.tolist()
    # A training record of the interleaved task is a few-shot prompt plus the query's answer.
    record = SyntheticSource(config, "train", "interleaved", size=5, max_images=3)[0]
    items = [
        {"question": q[len("<image> ") :], "answer": a}
        for (_, q), (_, a) in zip(record["turns"][::2], record["turns"][1::2], strict=True)
    ]
    assert fewshot_turns(items[:-1], items[-1]) + [("assistant", items[-1]["answer"])] == record["turns"]


def test_synthetic_interleaved_batches(tok):
    data = DataConfig(task="interleaved", max_length=96, max_images=3, size=16, shuffle=False)
    skipped = collections.Counter()
    batch = next(make_iterator(data, tok, SPEC, _idefics(tok), batch_size=4, seed=0, skipped=skipped))
    assert not skipped and batch["images"].shape == (4, 3, 8, 8, 3)
    image_id = tok.convert_tokens_to_ids("<image>")
    for b in range(4):
        record = SyntheticSource(SyntheticConfig(), "train", "interleaved", size=16, max_images=3)[b]
        n = len(record["images"])
        assert (batch["tokens"][b] == image_id).sum() == n  # one image token per image
        assert (
            np.abs(batch["images"][b, :n]).sum(axis=(1, 2, 3)).min() > 0
            and (batch["images"][b, n:] == 0).all()
        )
        learned = tok.convert_ids_to_tokens(batch["targets"][b][batch["loss_mask"][b] == 1].tolist())
        assert learned == [w for _, a in record["turns"][1::2] for w in (*a.split(), "</s>")]
