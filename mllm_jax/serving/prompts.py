"""Chat messages -> the prompt text the model's processor takes (with ``<image>`` where each image goes)
and the images in order.

The model's own chat template renders it when its processor or tokenizer has one (as transformers'
``apply_chat_template(messages, add_generation_prompt=True)``, images as ``{"type": "image"}`` parts);
otherwise the family's own default conversation format (``Family.chat_prompt``): LLaVA-1.5's for LLaVA,
IDEFICS-instruct's ``User: ...<end_of_utterance>\\nAssistant:`` for IDEFICS / Flamingo, BLIP-2's
``Question: ... Answer:`` (InstructBLIP: the plain instruction) for BLIP-2.
"""

from __future__ import annotations

from mllm_jax import families
from mllm_jax.families import base
from mllm_jax.serving.protocol import ApiError, Message


def hf_messages(messages: list[Message]) -> list[dict]:
    """transformers' multimodal message layout: content parts ``{"type": "text"|"image"}``."""
    return [
        {
            "role": m.role,
            "content": [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in m.parts
            ],
        }
        for m in messages
    ]


def default_prompt(messages: list[Message], family: str, config, eos: str = "</s>") -> str:
    """The family's default conversation format (``Family.chat_prompt``): images as None parts."""
    turns = [(m.role, [p if isinstance(p, str) else None for p in m.parts]) for m in messages]
    return families.get(family).chat_prompt(config, turns, eos)


def chat_template_owner(assets: str):
    """The processor or tokenizer saved in ``assets`` whose chat template renders prompts, or None."""
    for load in (base.load_processor, base.load_tokenizer):
        try:
            owner = load(assets)
        except Exception:  # noqa: BLE001 - a missing or unloadable processor: try the next, else the default
            continue
        if getattr(owner, "chat_template", None):
            return owner
    return None


def render(messages: list[Message], owner, pretrained, eos: str = "</s>") -> tuple[str, list]:
    """``(prompt text, images in order)``; ``owner`` from ``chat_template_owner`` (None: the default
    format of ``pretrained``'s family)."""
    images = [p for m in messages for p in m.parts if not isinstance(p, str)]
    if owner is None:
        return default_prompt(messages, pretrained.family, pretrained.config, eos), images
    try:
        if hasattr(owner, "tokenizer"):  # a processor: it knows image parts
            prompt = owner.apply_chat_template(
                hf_messages(messages), add_generation_prompt=True, tokenize=False
            )
        else:  # a tokenizer's template takes plain strings: the images go first as placeholders
            flat = [
                {"role": m["role"], "content": "".join(
                    f"{base.IMAGE_TOKEN}\n" if p["type"] == "image" else p["text"] for p in m["content"])}
                for m in hf_messages(messages)
            ]  # fmt: skip
            prompt = owner.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja's errors, or a template that rejects the roles
        raise ApiError(f"the model's chat template cannot render these messages: {e}") from None
    return prompt, images
