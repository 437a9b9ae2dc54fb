"""The grain pipeline: batch layout, label shift and masks, exact resumption, per-host slices, bad data."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data import pipeline
from mllm_jax.data.pipeline import DataConfig, Encoder, ModelSpec, heldout_questions, make_iterator
from mllm_jax.data.synthetic import QUESTION_TYPES, SyntheticConfig, make_example, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec

WORDS = [f"w{i}" for i in range(40)] + ["caption", "a", "b", "c", "d", "e", "f"]
TPI = 4
SPEC = ImageSpec(16, mode="resize")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocabulary(SyntheticConfig()) + WORDS)


def write_shard(path, keys: list[str], skip_caption: str = "") -> None:
    """An img2dataset-style shard: KEY.png, KEY.txt ("caption KEY"; none for ``skip_caption``), KEY.json."""
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            buf = io.BytesIO()
            Image.fromarray(np.full((6, 8, 3), 10 * i, np.uint8)).save(buf, "PNG")
            fields = {"png": buf.getvalue(), "txt": f"caption {key}".encode(), "json": b"{}"}
            for ext, data in fields.items():
                if not (ext == "txt" and key == skip_caption):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _model(tok) -> ModelSpec:
    return ModelSpec(image_token_id=tok.convert_tokens_to_ids("<image>"), tokens_per_image=TPI)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def test_batch_layout_and_masks(tok):
    data = DataConfig(max_length=24, size=64, shuffle=False)
    it = make_iterator(data, tok, SPEC, _model(tok), batch_size=4, seed=0)
    batch = next(it)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "images": ((4, 1, 16, 16, 3), np.float32),
        "tokens": ((4, 24), np.int32),
        "targets": ((4, 24), np.int32),
        "loss_mask": ((4, 24), np.float32),
        "attention_mask": ((4, 24), np.int32),
    }
    tokens, targets, mask, attn = (batch[k] for k in ("tokens", "targets", "loss_mask", "attention_mask"))
    np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
    assert (targets[:, -1] == tok.pad_token_id).all()
    image_id = tok.convert_tokens_to_ids("<image>")
    for b in range(4):
        n = attn[b].sum()
        assert (attn[b, :n] == 1).all() and (tokens[b, n:] == tok.pad_token_id).all()  # right padding
        assert tokens[b, 0] == tok.bos_token_id and (tokens[b] == image_id).sum() == TPI
        # Learned targets are exactly the one-word answer and its eos; never a prompt or image token.
        learned = tok.convert_ids_to_tokens(targets[b][mask[b] == 1].tolist())
        assert len(learned) == 2 and learned[1] == "</s>"
        words = tok.convert_ids_to_tokens(tokens[b, :n].tolist())
        assert words[words.index("ASSISTANT") + 2] == learned[0]
    for b in range(4):  # unshuffled: row b is synthetic example b, preprocessed by SPEC
        np.testing.assert_array_equal(
            batch["images"][b, 0], SPEC(make_example(SyntheticConfig(), "train", b)["image"])
        )


def test_synthetic_config_is_used(tok):
    config = SyntheticConfig(image_size=24, seed=7)
    data = DataConfig(task="caption", max_length=32, size=8, shuffle=False)
    batch = next(make_iterator(data, tok, SPEC, _model(tok), 2, seed=0, synthetic_config=config))
    np.testing.assert_array_equal(batch["images"][1, 0], SPEC(make_example(config, "train", 1)["image"]))


def test_resume_is_bit_identical(tok):
    data = DataConfig(max_length=24, size=50)  # epochs of 50 records: resumption crosses an epoch
    it = make_iterator(data, tok, SPEC, _model(tok), batch_size=8, seed=3)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 5)
    fresh = make_iterator(data, tok, SPEC, _model(tok), batch_size=8, seed=3)
    fresh.set_state(state)
    _assert_same(_take(fresh, 5), expected)


def test_epochs_reshuffle(tok):
    data = DataConfig(task="caption", max_length=24, size=8)
    it = make_iterator(data, tok, SPEC, _model(tok), batch_size=8, seed=0)
    first, second = next(it)["tokens"], next(it)["tokens"]
    assert not np.array_equal(first, second)  # a new order ...
    assert sorted(map(bytes, first)) == sorted(map(bytes, second))  # ... of the same records


def _text_only_json(tmp_path, n: int) -> str:
    records = [
        {"id": str(i), "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": f"w{i}"}]}
        for i in range(n)
    ]
    path = tmp_path / "text.json"
    path.write_text(json.dumps(records))
    return str(path)


def _learned(batches: list[dict], tok) -> list[list[str]]:
    """Per example, the target words the loss sees."""
    return [
        tok.convert_ids_to_tokens(b["targets"][i][b["loss_mask"][i] == 1].tolist())
        for b in batches
        for i in range(len(b["tokens"]))
    ]


def _answers(batches: list[dict], tok) -> list[str]:
    return [words[0] for words in _learned(batches, tok)]


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_hosts_read_their_rows_of_the_global_batches(tmp_path, tok, monkeypatch, count, shuffle):
    """``batch_size`` is global: host p's batches are rows p*b..(p+1)*b of the batches one process
    reads, and a host reads (decodes) only the records of its own rows."""
    n, global_batch = 24, 6
    data = DataConfig(source="llava_json", path=_text_only_json(tmp_path, n), max_length=16, shuffle=shuffle)
    single = _answers(_take(make_iterator(data, tok, SPEC, _model(tok), global_batch, seed=0), 8), tok)
    read = collections.defaultdict(set)  # process -> record ids it read
    host = {"p": 0}

    class Counting(pipeline.LlavaJsonSource):
        def __getitem__(self, index):
            record = super().__getitem__(index)
            read[host["p"]].add(record["where"])
            return record

    monkeypatch.setattr(pipeline, "LlavaJsonSource", Counting)
    rows = []
    for p in range(count):
        host["p"] = p
        it = make_iterator(
            data, tok, SPEC, _model(tok), global_batch, seed=0, process_index=p, process_count=count
        )
        batches = _take(it, 8)
        assert batches[0]["tokens"].shape[0] == global_batch // count
        rows.append([_answers([b], tok) for b in batches])
        del it
    together = [a for step in range(8) for p in range(count) for a in rows[p][step]]
    assert together == single
    if not shuffle:  # a fixed order: every epoch a host reads the same records, exactly its share
        assert all(len(read[p]) == n // count for p in range(count))
        assert len(set().union(*read.values())) == n


def test_a_global_batch_that_the_hosts_cannot_share_is_an_error(tmp_path, tok):
    data = DataConfig(source="llava_json", path=_text_only_json(tmp_path, 4), max_length=16)
    with pytest.raises(ValueError, match="batch size 5 does not divide over 2 processes"):
        make_iterator(data, tok, SPEC, _model(tok), 5, seed=0, process_index=0, process_count=2)


def test_llava_json_with_bad_images(tmp_path, tok):
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20 + i, 30, 3), 60 * i, np.uint8)).save(root / "coco" / f"{i}.png")
    (root / "coco" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    def rec(i, image, q="<image>\nwhat color is the circle ?", a="red"):
        convs = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        return {"id": str(i), "conversations": convs} | ({"image": image} if image else {})

    records = [rec(i, f"coco/{i}.png") for i in range(3)] + [
        rec(3, "coco/corrupt.png"),
        rec(4, "coco/missing.png"),
        rec(5, "../outside.png"),
        rec(6, None, q="how many shapes are there ?", a="two"),  # text-only
        rec(7, "coco/0.png", q="<image> <image> two images"),  # placeholders != images
    ]
    path = tmp_path / "llava.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    skipped = collections.Counter()
    data = DataConfig(source="llava_json", path=str(path), image_root=str(root), max_length=24, shuffle=False)
    it = make_iterator(data, tok, SPEC, _model(tok), batch_size=4, seed=0, skipped=skipped)
    batches = _take(it, 2)  # the 4 good records, twice (two epochs)
    assert skipped["bad_image"] >= 1 and skipped["missing_image"] >= 1 and skipped["unsafe_path"] >= 1
    assert set(skipped) == {"bad_image", "missing_image", "unsafe_path", "image_count_mismatch"}
    first = batches[0]
    assert _answers([first], tok) == ["red", "red", "red", "two"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ((first["tokens"] == image_id).sum(1) == [TPI, TPI, TPI, 0]).all()
    assert (first["images"][3] == 0).all() and np.abs(first["images"][:3]).sum(axis=(1, 2, 3, 4)).min() > 0
    _assert_same([batches[1]], [first])  # no shuffling: the second epoch repeats the first


def test_too_long_drops_instead_of_cutting_images(tmp_path, tok):
    long = " ".join(["a"] * 30)

    def rec(*texts, image=None):
        convs = [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]
        return {"conversations": convs} | ({"image": image} if image else {})

    records = [
        rec("a", "w1 " + long, "<image> a", "w4", image="x.png"),  # the image block would be cut: dropped
        rec("a", "w2 " + long),  # the answer is truncated: kept
        rec(long, "w3"),  # nothing left to learn: dropped
    ]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records))
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    skipped = collections.Counter()
    data = DataConfig(
        source="llava_json", path=str(path), image_root=str(tmp_path), max_length=16, shuffle=False
    )
    batch = next(make_iterator(data, tok, SPEC, _model(tok), batch_size=2, seed=0, skipped=skipped))
    assert set(skipped) == {"too_long", "no_targets"}
    assert (batch["attention_mask"] == 1).all() and _answers([batch], tok) == ["w2", "w2"]


def test_all_bad_examples_fail_loudly(tmp_path, tok, monkeypatch):
    records = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "a"}]} for i in range(5)]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(records))
    monkeypatch.setattr(Encoder, "MAX_BAD_STREAK", 20)
    data = DataConfig(source="llava_json", path=str(path), image_root=str(tmp_path))
    with pytest.raises(ValueError, match="bad examples in a row"):
        next(make_iterator(data, tok, SPEC, _model(tok), batch_size=2, seed=0))


def test_webdataset_pipeline(tmp_path, tok):
    for s, keys in enumerate(("ab", "cd", "ef")):
        write_shard(tmp_path / f"{s:05d}.tar", list(keys), skip_caption="f")
    data = DataConfig(source="webdataset", path=str(tmp_path), template="plain", max_length=16)
    skipped = collections.Counter()
    it = make_iterator(data, tok, SPEC, _model(tok), batch_size=2, seed=1, skipped=skipped)
    batches = _take(it, 4)
    assert skipped["missing_caption"] >= 1
    assert {tuple(w) for w in _learned(batches, tok)} <= {("caption", k) for k in "abcde"}
    assert batches[0]["images"].shape == (2, 1, 16, 16, 3)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = make_iterator(data, tok, SPEC, _model(tok), batch_size=2, seed=1)
    fresh.set_state(state)
    _assert_same(_take(fresh, 3), expected)


@pytest.mark.parametrize("count", [2, 4])  # 3 shards: split by shard for 2 hosts, by record for 4
def test_webdataset_per_host(tmp_path, tok, count):
    for s, keys in enumerate(("ab", "cd", "ef")):
        write_shard(tmp_path / f"{s:05d}.tar", list(keys))
    data = DataConfig(source="webdataset", path=str(tmp_path), template="plain", max_length=16, shuffle=False)
    seen = []
    for p in range(count):
        it = make_iterator(data, tok, SPEC, _model(tok), count, seed=0, process_index=p, process_count=count)
        seen.append({words[1] for words in _learned(_take(it, 6), tok)})  # global batch count: 1 per host
    assert set().union(*seen) == set("abcdef") and sum(len(s) for s in seen) == 6


def test_worker_processes(tok):
    data = DataConfig(max_length=24, size=40)
    expected = _take(make_iterator(data, tok, SPEC, _model(tok), batch_size=4, seed=5), 2)
    workers = dataclasses.replace(data, num_workers=2)
    it = make_iterator(workers, tok, SPEC, _model(tok), batch_size=4, seed=5)
    try:
        got = _take(it, 2)
    finally:
        it.close()
    # Each worker batches its own slice (elements i::2), so batches hold the same examples regrouped.
    rows = lambda batches: sorted(
        b["tokens"][i].tobytes() + b["images"][i].tobytes() for b in batches for i in range(4)
    )
    assert rows(got) == rows(expected)


def test_heldout_questions():
    config = SyntheticConfig()
    items = heldout_questions(config, 10)
    again = heldout_questions(config, 10)
    for a, b in zip(items, again, strict=True):
        assert a.keys() == b.keys() == {"image", "question", "answer", "type"}
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [q["type"] for q in items] == list(QUESTION_TYPES) * 2 + list(QUESTION_TYPES[:2])
    train_images = {make_example(config, "train", i)["image"].tobytes() for i in range(200)}
    for q in items:
        assert q["image"].dtype == np.uint8 and q["image"].tobytes() not in train_images


MIXED = DataConfig(
    max_length=64,
    max_images=2,
    size=40,
    mix=({"weight": 3.0, "task": "caption"}, {"weight": 1.0, "task": "interleaved", "size": 20}),
)


def test_mix_follows_the_weights_and_resumes_exactly(tok):
    it = make_iterator(MIXED, tok, SPEC, _model(tok), batch_size=8, seed=2)
    first = _take(it, 2)
    image_id = tok.convert_tokens_to_ids("<image>")
    images = np.concatenate([(b["tokens"] == image_id).sum(1) // TPI for b in first])
    assert set(images) == {1, 2} and (images == 1).sum() == 12  # 3 : 1, caption : two-image documents
    state = it.get_state()
    expected = _take(it, 4)
    fresh = make_iterator(MIXED, tok, SPEC, _model(tok), batch_size=8, seed=2)
    fresh.set_state(state)
    _assert_same(_take(fresh, 4), expected)


def test_text_tokens_for_a_qformer(tok):
    # A second vocabulary (reversed word order) stands in for the Q-Former's BERT tokenizer.
    text_tok = build_tokenizer(list(reversed(vocabulary(SyntheticConfig()))))
    words = lambda ids: text_tok.convert_ids_to_tokens([int(i) for i in ids])  # noqa: E731
    for task, n_text in (("caption", 24), ("vqa", 24), ("vqa", 3)):
        data = DataConfig(task=task, max_length=40, size=8, shuffle=False, text_length=n_text)
        batch = next(make_iterator(data, tok, SPEC, _model(tok), 2, seed=0, text_tokenizer=text_tok))
        assert batch["text_tokens"].shape == batch["text_mask"].shape == (2, n_text)
        assert batch["text_tokens"].dtype == batch["text_mask"].dtype == np.int32
        for b in range(2):
            ex = make_example(SyntheticConfig(), "train", b)
            if task == "caption":
                text = ex["caption"]
            else:  # the question asked in the LM sequence, then its answer
                lm = tok.convert_ids_to_tokens(batch["tokens"][b][batch["attention_mask"][b] == 1].tolist())
                question = " ".join(lm[lm.index("<image>") + TPI : lm.index("ASSISTANT")])
                answer = tok.convert_ids_to_tokens(batch["targets"][b][batch["loss_mask"][b] == 1].tolist())[
                    0
                ]
                text = f"{question} {answer}"
            expected = (["<s>"] + text.split())[:n_text]
            n = batch["text_mask"][b].sum()
            assert words(batch["text_tokens"][b][:n]) == expected and n == len(expected)
            assert (batch["text_mask"][b][:n] == 1).all() and (
                batch["text_tokens"][b][n:] == text_tok.pad_token_id
            ).all()
    data = DataConfig(
        task="interleaved_caption", max_length=64, max_images=2, size=8, shuffle=False, text_length=32
    )
    batch = next(make_iterator(data, tok, SPEC, _model(tok), 1, seed=0))  # default: the LM's tokenizer
    lm = tok.convert_ids_to_tokens(batch["targets"][0][batch["loss_mask"][0] == 1].tolist())[:-1]  # the text
    assert (
        tok.convert_ids_to_tokens(batch["text_tokens"][0][batch["text_mask"][0] == 1].tolist())
        == ["<s>"] + lm
    )


def test_too_many_skipped_records_fail_with_a_summary(tmp_path, tok):
    records = [
        {"id": str(i), "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "w1"}]}
        | ({"image": f"gone/{i}.png"} if i % 10 == 3 else {})
        for i in range(300)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    base = DataConfig(
        source="llava_json", path=str(path), image_root=str(tmp_path), max_length=16, shuffle=False
    )
    it = make_iterator(base, tok, SPEC, _model(tok), batch_size=10, seed=0)  # 10% skipped > 5%
    with pytest.raises(ValueError) as e:
        _take(it, 60)
    message = str(e.value)
    assert "data.max_skipped_fraction=0.05" in message and "missing_image" in message
    # Bad records named as file:line (records 3, 13, ... are lines 4, 14, ...; threads pick the order).
    lines = [int(n) for n in re.findall(re.escape(str(path)) + r":(\d+) \(missing_image\)", message)]
    assert 1 <= len(lines) <= 3 and all(n % 10 == 4 for n in lines)
    tolerant = dataclasses.replace(base, max_skipped_fraction=0.2)
    assert len(_take(make_iterator(tolerant, tok, SPEC, _model(tok), batch_size=10, seed=0), 60)) == 60


def test_text_tokens_of_the_prompt_for_instructblip(tok):
    # text_source="prompt": the Q-Former reads what InstructBlipProcessor gets at inference, the rendered
    # prompt before the answer with the image removed, not the answer.
    data = DataConfig(task="vqa", max_length=40, size=8, shuffle=False, text_length=24, text_source="prompt")
    batch = next(make_iterator(data, tok, SPEC, _model(tok), 2, seed=0))
    for b in range(2):
        lm = tok.convert_ids_to_tokens(batch["tokens"][b][batch["attention_mask"][b] == 1].tolist())
        first_target = int(np.flatnonzero(batch["loss_mask"][b])[0]) + 1  # tokens[i + 1] is target i
        prompt = [w for w in lm[1:first_target] if w != "<image>"]
        assert prompt[0] == "USER" and prompt[-1] in ("ASSISTANT", ":")
        words = tok.convert_ids_to_tokens(batch["text_tokens"][b][batch["text_mask"][b] == 1].tolist())
        assert words == ["<s>"] + prompt
    with pytest.raises(ValueError, match="text_source"):
        DataConfig(text_source="answer")
