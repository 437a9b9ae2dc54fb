"""Conversation templates: exact renderings, answer-only label masks, image expansion, prompt prefixes."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers
from transformers import PreTrainedTokenizerFast

from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.templates import (
    TEMPLATES,
    VICUNA_SYSTEM,
    encode_conversation,
    encode_prompt,
    render_text,
)
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.errors import BadExample

TURNS = [
    ("user", "<image> how many shapes are there ?"),
    ("assistant", "two"),
    ("user", "what color is the circle ?"),
    ("assistant", "red"),
    ("user", "what shape is the blue one ?"),
    ("assistant", "a square ."),
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
TPI = 3  # tokens per image


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer(vocabulary(SyntheticConfig()) + ["user", "assistant"])
    t.chat_template = CHAT_TEMPLATE
    return t


def _learned_words(tok, tokens, learn) -> list[str]:
    return tok.convert_ids_to_tokens(tokens[learn].tolist())


def test_tiny_rendering_and_mask(tok):
    assert render_text("tiny", tok, TURNS[:4]) == (
        "USER : <image> how many shapes are there ? ASSISTANT : two </s> "
        "USER : what color is the circle ? ASSISTANT : red </s>"
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    tokens, learn = encode_conversation("tiny", tok, TURNS, image_id, TPI)
    assert tokens.dtype == np.int32 and learn.dtype == bool and tokens.shape == learn.shape
    assert tokens[0] == tok.bos_token_id and tok.unk_token_id not in tokens
    # Only the answers and the eos closing each of them are learned; prompts and images never.
    assert _learned_words(tok, tokens, learn) == ["two", "</s>", "red", "</s>", "a", "square", ".", "</s>"]
    assert not learn[tokens == image_id].any()
    words = tok.convert_ids_to_tokens(tokens.tolist())
    assert words[:7] == ["<s>", "USER", ":", "<image>", "<image>", "<image>", "how"]


def test_vicuna_v1_is_llava_text(tok):
    turns = [
        ("user", "<image>\nWhat are the colors of the bus in the image?"),
        ("assistant", "The bus in the image is white and red."),
        ("user", "What feature can be seen on the back of the bus?"),
        ("assistant", "The back of the bus features an advertisement."),
    ]
    # What LLaVA's conv_vicuna_v1.get_prompt() returns for this conversation.
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat are the "
        "colors of the bus in the image? ASSISTANT: The bus in the image is white and red.</s>USER: What "
        "feature can be seen on the back of the bus? ASSISTANT: The back of the bus features an "
        "advertisement.</s>"
    )
    assert render_text("vicuna_v1", tok, turns) == expected
    assert expected.startswith(VICUNA_SYSTEM + " USER: ")
    # The generation prompt ends right after "ASSISTANT:", as LLaVA's prompt for inference does.
    assert render_text("vicuna_v1", tok, turns[:3]) == expected[: expected.rindex(" The back")]


def test_plain_learns_caption_only(tok):
    image_id = tok.convert_tokens_to_ids("<image>")
    turns = [("user", "<image>\nwhat color is the circle ?"), ("assistant", "a red circle .")]
    assert render_text("plain", tok, turns) == "<image>a red circle .\n"
    tokens, learn = encode_conversation("plain", tok, turns, image_id, TPI)
    assert tokens.tolist() == [tok.bos_token_id, *[image_id] * TPI, *tok.encode("a red circle .")[1:]]
    assert learn.tolist() == [False] * (1 + TPI) + [True] * 4


@pytest.mark.parametrize("name", [*TEMPLATES, "chat"])
def test_image_expansion(tok, name):
    image_id = 999  # not the tokenizer's "<image>" id: proves the placeholder is never tokenized as text
    turns = [
        ("user", "<image> <image> describe"),
        ("assistant", "two"),
        ("user", "<image> ?"),
        ("assistant", "one"),
    ]
    tokens, learn = encode_conversation(name, tok, turns, image_id, 5)
    is_image = tokens == image_id
    assert is_image.sum() == 3 * 5 and not learn[is_image].any()
    assert tok.convert_tokens_to_ids("<image>") not in tokens


@pytest.mark.parametrize("name", [*TEMPLATES, "chat"])
def test_prompt_is_prefix_of_conversation(tok, name):
    image_id = tok.convert_tokens_to_ids("<image>")
    tokens, learn = encode_conversation(name, tok, TURNS, image_id, TPI)
    previous = 0
    for k in range(3):
        prompt = encode_prompt(name, tok, TURNS[: 2 * k + 1], image_id, TPI)
        assert prompt.dtype == np.int32
        np.testing.assert_array_equal(prompt, tokens[: len(prompt)])
        # ... and the k-th answer starts right there.
        assert learn[len(prompt)] and len(prompt) > previous
        previous = len(prompt)


def test_chat_template_mask(tok):
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (
        render_text("chat", tok, TURNS[:2])
        == "<s>user : <image> how many shapes are there ? </s> assistant : two </s> "
    )
    tokens, learn = encode_conversation("chat", tok, TURNS[:4], image_id, TPI)
    assert (tokens == tok.bos_token_id).sum() == 1  # the template's BOS, not one more
    # The template's end-of-turn marker is learned with the answer.
    assert _learned_words(tok, tokens, learn) == ["two", "</s>", "red", "</s>"]


def test_chat_requires_a_template():
    tok = build_tokenizer(vocabulary(SyntheticConfig()))
    with pytest.raises(ValueError, match="chat_template"):
        encode_conversation("chat", tok, TURNS[:2], 5, 1)


@pytest.mark.parametrize(
    "turns",
    [
        [],
        [("assistant", "two")],
        [("user", "q"), ("user", "q")],
        [("user", "q"), ("assistant", "<image> two")],
        [("user", "q"), ("assistant", "a"), ("user", "q2")],  # training needs a final answer
    ],
)
def test_malformed_turns(tok, turns):
    with pytest.raises(BadExample):
        encode_conversation("tiny", tok, turns, 5, 1)


def test_unknown_template(tok):
    with pytest.raises(ValueError, match="unknown template"):
        encode_conversation("alpaca", tok, TURNS[:2], 5, 1)


def test_sentencepiece_style_answer_has_no_spurious_space_token():
    # LLaMA-1/2 style tokenizer.json (normalizer prepends "▁" to every encoded string): encoding the
    # answer segment " The bus" on its own gives ["▁", "▁The", ...]; the sentence as a whole gives
    # ["▁The", "▁bus"], and so must the training sequence.
    chars = ["<unk>", "<s>", "</s>", "▁", "T", "h", "e", "b", "u", "s", "q"]
    merges = [("▁", "T"), ("▁T", "h"), ("▁Th", "e"), ("▁", "b"), ("▁b", "u"), ("▁bu", "s"), ("▁", "q")]
    vocab = {w: i for i, w in enumerate(chars + [a + b for a, b in merges])}
    t = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok.convert_ids_to_tokens(tok.encode(" The bus", add_special_tokens=False))[0] == "▁"
    tokens, learn = encode_conversation("vicuna_v1", tok, [("user", "q"), ("assistant", "The bus")], 99, 1)
    assert tok.convert_ids_to_tokens(tokens[learn].tolist()) == ["▁The", "▁bus", "</s>"]
