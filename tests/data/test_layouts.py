"""Image layouts per family: prompts token for token as the HF processors lay them out, training
sequences extend their prompts, documents learn only their text."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from mllm_jax.data.fewshot import fewshot_turns, support_questions
from mllm_jax.data.layouts import ModelSpec, truncate
from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.templates import encode_conversation, encode_document, encode_prompt, render_text
from mllm_jax.data.tokenizer import build_tokenizer

FAKE = "<fake_token_around_image>"
Q = 3  # BLIP-2 query tokens / LLaVA image tokens per image
IMG = Image.new("RGB", (8, 8), (200, 30, 30))
PROMPTS = {  # name -> turns ending with a user turn
    "one_image": [("user", "<image> what color is the circle ?")],
    "image_last": [("user", "what color is the circle ? <image>")],
    "two_images_in_a_row": [("user", "<image> <image> how many shapes are there ?")],
    "text_only": [("user", "how many shapes are there ?")],
    "two_shot": fewshot_turns(
        support_questions(SyntheticConfig(), 2), {"question": "what shape is the red one ?"}
    ),
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocabulary(SyntheticConfig()), extra_special=("<image>", FAKE))


def _specs(tok) -> dict[str, ModelSpec]:
    image, fake = tok.convert_tokens_to_ids(["<image>", FAKE])
    return {
        "llava": ModelSpec(image, Q),
        "idefics": ModelSpec(image, 64, layout="wrapped", around_token_id=fake),
        "blip2": ModelSpec(image, Q, layout="prefix"),
    }


def _idefics_prompt(text: str) -> list:
    """The rendered prompt as IdeficsProcessor's interleaved list (text pieces and images)."""
    out = []
    for k, piece in enumerate(text.split("<image>")):
        if k:
            out.append(IMG)
        if piece.strip(" "):
            out.append(piece)
    return out


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_idefics_prompt_matches_idefics_processor(tok, name):
    from transformers import IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    processor = IdeficsProcessor(IdeficsImageProcessorPil(image_size=8), tok, image_size=8)
    turns = PROMPTS[name]
    hf = processor(text=[_idefics_prompt(render_text("tiny", tok, turns))], return_tensors="pt")
    ours = encode_prompt("tiny", tok, turns, _specs(tok)["idefics"])
    assert ours.tolist() == hf["input_ids"][0].tolist()
    words = tok.convert_ids_to_tokens(ours.tolist())
    assert words.count("<image>") == render_text("tiny", tok, turns).count("<image>")


@pytest.mark.parametrize("name", ["one_image", "image_last", "text_only"])
def test_blip2_prompt_matches_blip2_processor(tok, name):
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    processor = Blip2Processor(BlipImageProcessorPil(size={"height": 8, "width": 8}), tok, num_query_tokens=Q)
    turns = PROMPTS[name]
    text = render_text("tiny", tok, turns)
    images = IMG if "<image>" in text else None
    hf = processor(images=images, text=re.sub(r"<image>\s*", "", text))
    ours = encode_prompt("tiny", tok, turns, _specs(tok)["blip2"])
    assert ours.tolist() == hf["input_ids"][0]
    if images is not None:  # the queries come before BOS, nothing of the placeholder stays in place
        assert tok.convert_ids_to_tokens(ours[: Q + 1].tolist()) == ["<image>"] * Q + ["<s>"]


@pytest.mark.parametrize("name", ["one_image", "two_images_in_a_row", "two_shot"])
def test_llava_prompt_matches_llava_processor(tok, name):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    # 8x8 images, 4x4 patches + CLS: 4 features ("default" drops the CLS one)
    processor = LlavaProcessor(
        ip, tok, patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )
    turns = PROMPTS[name]
    text = render_text("tiny", tok, turns)
    hf = processor(images=[IMG] * text.count("<image>"), text=text)
    image_id = tok.convert_tokens_to_ids("<image>")
    # The old (image id, tokens per image) call still means LLaVA's layout.
    assert encode_prompt("tiny", tok, turns, image_id, 4).tolist() == hf["input_ids"][0]
    assert encode_prompt("tiny", tok, turns, ModelSpec(image_id, 4)).tolist() == hf["input_ids"][0]


@pytest.mark.parametrize("layout", ["llava", "idefics", "blip2"])
def test_prompt_is_a_prefix_of_the_training_sequence(tok, layout):
    spec = _specs(tok)[layout]
    for name, turns in PROMPTS.items():
        full, learn = encode_conversation("tiny", tok, [*turns, ("assistant", "red")], spec)
        prompt = encode_prompt("tiny", tok, turns, spec)
        assert full[: len(prompt)].tolist() == prompt.tolist(), name
        after = full[len(prompt) :][learn[len(prompt) :]]
        assert tok.convert_ids_to_tokens(after.tolist()) == ["red", "</s>"], name
        assert not learn[np.isin(full, [spec.image_token_id, spec.around_token_id or -1])].any()


def test_plain_template_blip2_is_queries_bos_caption(tok):
    spec = _specs(tok)["blip2"]
    tokens, learn = encode_conversation(
        "plain", tok, [("user", "<image>"), ("assistant", "a red circle .")], spec
    )
    words = tok.convert_ids_to_tokens(tokens.tolist())
    assert words == ["<image>"] * Q + ["<s>", "a", "red", "circle", "."]  # "\n" is whitespace here
    assert learn.tolist() == [False] * (Q + 1) + [True] * 4


DOC = [("text", "a red circle ."), ("image", None), ("image", None), ("text", "two"), ("image", None)]


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("llava", "<s> a red circle . I I I I I I two I I I </s>"),
        ("idefics", "<s> a red circle . F I F I F two F I F </s>"),
        ("blip2", "I I I I I I I I I <s> a red circle . two </s>"),
    ],
)
def test_document_layouts_and_mask(tok, layout, expected):
    spec = _specs(tok)[layout]
    tokens, learn = encode_document(tok, DOC, spec)
    words = tok.convert_ids_to_tokens(tokens.tolist())
    assert " ".join(words).replace("<image>", "I").replace(FAKE, "F") == expected
    # Every text token and the closing eos are learned; images, fake tokens and BOS never.
    is_text = ~np.isin(tokens, [spec.image_token_id, spec.around_token_id or -1, tok.bos_token_id])
    np.testing.assert_array_equal(learn, is_text)


def test_truncate_never_keeps_part_of_an_image(tok):
    specs = _specs(tok)
    tokens, learn = encode_document(tok, DOC, specs["llava"])
    cut, cut_learn, n = truncate(tokens, learn, 7, specs["llava"])  # inside the first block of 3
    assert tok.convert_ids_to_tokens(cut.tolist()) == ["<s>", "a", "red", "circle", "."] and n == 0
    assert len(cut_learn) == len(cut)
    cut, _, n = truncate(tokens, learn, 10, specs["llava"])  # one whole block and part of the second
    assert n == 1 and (cut == specs["llava"].image_token_id).sum() == Q and len(cut) == 8
    tokens, learn = encode_document(tok, DOC, specs["idefics"])
    cut, _, n = truncate(tokens, learn, 8, specs["idefics"])  # "<s> a red circle . F I F": one image
    assert n == 1 and len(cut) == 8


def test_bad_specs_and_documents(tok):
    with pytest.raises(ValueError, match="around_token_id"):
        ModelSpec(5, 1, layout="wrapped")
    with pytest.raises(ValueError, match="layout"):
        ModelSpec(5, 1, layout="flamingo")
    from mllm_jax.errors import BadExample

    for bad in ([("text", "a <image> b")], [("video", 1)], ["text"]):
        with pytest.raises(BadExample) as e:
            encode_document(tok, bad, _specs(tok)["llava"])
        assert e.value.reason == "bad_document"
