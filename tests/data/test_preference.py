"""Preference pairs (data/preference.py): the ``preference_json`` source, bad records skipped and counted
like other data, and a pair batch ``[B, 2, T]`` whose rows are the prompt followed by each answer."""

import collections
import json

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data.pipeline import DataConfig, ModelSpec, make_iterator
from mllm_jax.data.preference import preference_record
from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec

CONFIG = SyntheticConfig(existence_questions=True)
SPEC = ImageSpec(16, mode="resize")
TPI = 4


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocabulary(CONFIG))


def _model(tok):
    return ModelSpec(image_token_id=tok.convert_tokens_to_ids("<image>"), tokens_per_image=TPI)


GOOD = {"image": "a.png", "prompt": "is there a red circle in the image ?", "chosen": "no", "rejected": "yes"}
BAD = [
    {"image": "a.png", "prompt": "is there a red circle ?", "chosen": "no"},  # no rejected
    {"image": "a.png", "prompt": "what color is the circle ?", "chosen": "red", "rejected": "red"},
    {"image": "a.png", "prompt": "", "chosen": "red", "rejected": "blue"},
    {"image": 7, "prompt": "what color is the circle ?", "chosen": "red", "rejected": "blue"},
    ["not", "an", "object"],
]


def test_records_and_their_errors():
    r = preference_record(GOOD | {"id": 3}, "/data")
    assert r["images"] == ["/data/a.png"] and r["turns"] == [
        ("user", "<image>\nis there a red circle in the image ?")
    ]
    assert (r["chosen"], r["rejected"], r["id"]) == ("no", "yes", "3")
    assert (
        preference_record({k: v for k, v in GOOD.items() if k != "image"}, "")["turns"][0][1]
        == GOOD["prompt"]
    )
    for raw in BAD:
        assert preference_record(raw, "/data")["error"] == "bad_preference", raw
    assert preference_record(GOOD | {"image": "../../etc/passwd"}, "/data")["error"] == "unsafe_path"


def test_preference_json_pairs_and_bad_records_are_counted(tmp_path, tok):
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "a.png")
    lines = [json.dumps(GOOD)] * 6 + [json.dumps(b) for b in BAD] + ["{not json"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines))
    data = DataConfig(
        source="preference_json",
        path=str(path),
        image_root=str(tmp_path),
        max_length=24,
        shuffle=False,
        max_skipped_fraction=1.0,
    )
    skipped = collections.Counter()
    it = make_iterator(data, tok, SPEC, _model(tok), batch_size=4, seed=0, skipped=skipped)
    batch = next(it)
    next(it)  # 8 pairs: past the end of the file's 6 good ones, so its bad records have been read
    assert batch["tokens"].shape == (4, 2, 24) and batch["images"].shape == (4, 1, 16, 16, 3)
    assert batch["loss_mask"].shape == batch["targets"].shape == batch["attention_mask"].shape == (4, 2, 24)
    # (the reader prefetches past the file's end: every epoch counts its bad records again)
    assert skipped["bad_json"] >= 1 and skipped["bad_preference"] == 5 * skipped["bad_json"]
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("yes", "no")}
    for row, answer in ((0, "no"), (1, "yes")):  # row 0 chosen, row 1 rejected
        learned = batch["targets"][0, row][batch["loss_mask"][0, row] > 0]
        assert learned[0] == ids[answer] and learned[-1] == tok.eos_token_id
    # the prompts are the same tokens; only the answers differ
    n = int(np.argmax(batch["loss_mask"][0, 0]))
    np.testing.assert_array_equal(batch["tokens"][0, 0, : n + 1], batch["tokens"][0, 1, : n + 1])


def test_synthetic_preference_batches(tok):
    data = DataConfig(task="preference", max_length=40)
    batch = next(make_iterator(data, tok, SPEC, _model(tok), batch_size=8, seed=0, synthetic_config=CONFIG))
    assert batch["tokens"].shape == (8, 2, 40)
    assert (batch["loss_mask"].sum(-1) > 0).all()
    assert not any(np.array_equal(*pair) for pair in batch["tokens"])
