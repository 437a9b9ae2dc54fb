"""Each family's default conversation format (``Family.chat_prompt``), which ``serve`` renders for a
model with no chat template: string-level, against each format's own source (LLaVA-1.5's
``conversation.py``, the IDEFICS-instruct model card's prompt, BLIP-2's and LAVIS's prompts)."""

import dataclasses

from PIL import Image

from mllm_jax.families import base
from mllm_jax.models.blip2 import Blip2Config
from mllm_jax.models.qformer import QFormerConfig
from mllm_jax.serving import prompts
from mllm_jax.serving.protocol import Message

IMAGE = Image.new("RGB", (4, 4))


def llava_v1_get_prompt(system: str, messages: list[tuple[str, str]]) -> str:
    """LLaVA-1.5's ``conv_llava_v1.get_prompt()`` (SeparatorStyle.TWO, sep " ", sep2 "</s>"), as in
    ``llava/conversation.py``; a message ``None`` is the open turn the model answers."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def test_llava_is_llava_1_5s_conversation():
    conversation = [
        Message("system", ["A chat."]),
        Message("user", [IMAGE, "What is it?"]),
        Message("assistant", ["A cat."]),
        Message("user", ["And the colour?"]),
    ]
    prompt, images = prompts.render(conversation, None, base.Pretrained("llava", None, {}, {}))
    turns = [("USER", "<image>\nWhat is it?"), ("ASSISTANT", "A cat."), ("USER", "And the colour?")]
    expected = llava_v1_get_prompt("A chat.", [*turns, ("ASSISTANT", None)])
    assert prompt == expected and images == [IMAGE]


def test_idefics_is_the_instruct_model_cards_format():
    # the IDEFICS-9B-instruct model card's prompt list, each image as the processor's <image> placeholder
    card = [
        "User: What is in this image?",
        "<image>",
        "<end_of_utterance>",
        "\nAssistant: This picture depicts Idefix, the dog of Obelix.<end_of_utterance>",
        "\nUser:",
        "<image>",
        "And who is that?<end_of_utterance>",
        "\nAssistant:",
    ]
    conversation = [
        Message("user", ["What is in this image?", IMAGE]),
        Message("assistant", ["This picture depicts Idefix, the dog of Obelix."]),
        Message("user", [IMAGE, "And who is that?"]),
    ]
    prompt, images = prompts.render(conversation, None, base.Pretrained("idefics", None, {}, {}))
    assert prompt == "".join(card) and len(images) == 2


def test_blip2_question_answer_and_instructblip_plain():
    blip2 = base.Pretrained("blip2", Blip2Config(), {}, {})
    one = [Message("user", [IMAGE, "how many cats are there?"])]
    assert prompts.render(one, None, blip2)[0] == "Question: how many cats are there? Answer:"  # HF's docs
    # LAVIS's chat demo: earlier turns "Question: {} Answer: {}." joined by spaces
    chat = [Message("user", [IMAGE, "which city is this?"]), Message("assistant", ["singapore"])]
    chat.append(Message("user", ["why?"]))
    assert prompts.render(chat, None, blip2)[0] == (
        "Question: which city is this? Answer: singapore. Question: why? Answer:"
    )
    qformer = QFormerConfig(text_input=True, text_ffn=True)
    instruct = base.Pretrained("blip2", dataclasses.replace(Blip2Config(), qformer=qformer), {}, {})
    assert prompts.render(one, None, instruct)[0] == "how many cats are there?"  # the instruction
