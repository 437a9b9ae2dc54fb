"""The word-level tokenizer: id layout, coverage of the synthetic text and HF save/load round trip."""

from __future__ import annotations

from transformers import AutoTokenizer

from mllm_jax.data.synthetic import SyntheticConfig, make_example, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer

CONFIG = SyntheticConfig()


def _texts(n: int = 100) -> list[str]:
    out = []
    for i in range(n):
        ex = make_example(CONFIG, "train", i)
        out.append(f"USER : <image> {ex['caption']}")
        out += [f"USER : <image> {q['question']} ASSISTANT : {q['answer']}" for q in ex["questions"]]
    return out


def test_id_layout():
    words = vocabulary(CONFIG)
    tok = build_tokenizer(words)
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(words) == list(range(4, 4 + len(words)))
    assert tok.convert_tokens_to_ids("<image>") == len(tok) - 1 == len(words) + 4


def test_encodes_synthetic_text_without_unk():
    tok = build_tokenizer(vocabulary(CONFIG))
    image_id = tok.convert_tokens_to_ids("<image>")
    for text in _texts():
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert len(ids) == len(text.split()) + 1  # one token per word: "<image>" is not split
        assert ids.count(image_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text.replace("<image> ", "")
    assert tok("purple")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]


def test_save_load_round_trip(tmp_path):
    tok = build_tokenizer(vocabulary(CONFIG))
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
    specials = ("bos_token", "eos_token", "pad_token", "unk_token")
    assert [getattr(loaded, s) for s in specials] == ["<s>", "</s>", "<pad>", "<unk>"]
    texts = _texts(20)
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert loaded.convert_tokens_to_ids("<image>") == tok.convert_tokens_to_ids("<image>")
