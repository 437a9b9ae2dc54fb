"""Conversation templates: turns -> token ids plus a mask of which tokens are learned.

A conversation is rendered as a list of text segments, each either learned (an answer and the end
marker closing it) or not (system prompt, user turns, role prefixes). Segments are tokenized one by
one and concatenated, so the mask is exact by construction, and a generation prompt is literally a
prefix of the training sequence (``encode_prompt``), whatever the tokenizer's merge rules would do
across a segment boundary.

``<image>`` in user text is never tokenized as text: the model's layout (``layouts.py``) turns it into
image tokens (LLaVA: ``tokens_per_image`` copies in place, the positions ``models.mllm.splice_images``
fills; IDEFICS: one wrapped in fake tokens; BLIP-2: the query tokens in front of the sequence).
Interleaved documents (``encode_document``) use the same layouts, with every text token learned.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax.data.layouts import IMAGE, ModelSpec, as_spec, lay_out, split_images
from mllm_jax.errors import BadExample

ROLES = ("user", "assistant")
CHAT = "chat"  # template name: the tokenizer's own chat template (tokenizer.apply_chat_template)


@dataclasses.dataclass(frozen=True)
class Template:
    """One turn renders as ``sep + user_prefix + user + user_suffix + assistant_prefix`` (not learned)
    followed by ``answer_prefix + answer + answer_suffix`` (learned); ``sep`` only between turns.
    ``{eos}`` in ``answer_suffix`` stands for the tokenizer's eos token."""

    system: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    answer_prefix: str = ""
    answer_suffix: str = ""
    sep: str = ""
    # False: the user text is dropped except its images (LLaVA's stage-1 "plain" captioning format).
    keep_user_text: bool = True


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES = {
    # LLaVA's conv_llava_plain: "<image>caption\n", only "caption\n" learned.
    "plain": Template(answer_suffix="\n", keep_user_text=False),
    # LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO, sep=" ", sep2="</s>"), character for character:
    # "{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"
    "vicuna_v1": Template(
        system=VICUNA_SYSTEM + " ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT:",
        answer_prefix=" ",
        answer_suffix="{eos}",
    ),
    # For word-level tokenizers (built-in synthetic data): every piece is a whitespace-separated word.
    "tiny": Template(
        user_prefix="USER : ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT :",
        answer_prefix=" ",
        answer_suffix=" {eos}",
        sep=" ",
    ),
}


def _check_turns(turns: list[tuple[str, str]], final_role: str) -> None:
    if not turns:
        raise BadExample("empty_conversation")
    for i, (role, text) in enumerate(turns):
        if role != ROLES[i % 2]:
            raise BadExample("bad_turns", f"turn {i} is {role!r}, expected {ROLES[i % 2]!r} (alternating)")
        if not isinstance(text, str):
            raise BadExample("bad_turns", f"turn {i} text is {type(text).__name__}")
        if role == "assistant" and IMAGE in text:
            raise BadExample("bad_turns", f"{IMAGE} in an assistant turn")
    if turns[-1][0] != final_role:
        raise BadExample("bad_turns", f"conversation must end with a {final_role} turn")


def _table_segments(t: Template, tokenizer, turns) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token or ""
    segments = [(t.system, False)] if t.system else []
    for i, (role, text) in enumerate(turns):
        if role == "user":
            user = text if t.keep_user_text else IMAGE * text.count(IMAGE)
            sep = t.sep if i else ""
            segments.append((sep + t.user_prefix + user + t.user_suffix + t.assistant_prefix, False))
        else:
            segments.append((t.answer_prefix + text + t.answer_suffix.format(eos=eos), True))
    return _merge(segments)


def _chat_segments(tokenizer, turns) -> list[tuple[str, bool]]:
    """Segments from ``tokenizer.apply_chat_template``: each answer is what rendering one more turn
    adds after the generation prompt, so the template's end-of-turn marker is learned with it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer with a chat_template")

    def render(upto: int, prompt: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in turns[:upto]]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    segments, done = [], ""
    for i, (role, _) in enumerate(turns):
        if role == "user":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        # Templates that rewrite earlier turns (e.g. drop reasoning from past answers) cannot be masked
        # by prefixes: fail loudly, it is a configuration error, not a bad example.
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template is not prefix-stable; use a TEMPLATES entry")
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    if turns[-1][0] == "user":
        prompt = render(len(turns), True)
        if not prompt.startswith(done):
            raise ValueError("the tokenizer's chat template is not prefix-stable; use a TEMPLATES entry")
        segments.append((prompt[len(done) :], False))
    return _merge(segments)


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, learn in segments:
        if not text:
            continue
        if out and out[-1][1] == learn:
            out[-1] = (out[-1][0] + text, learn)
        else:
            out.append((text, learn))
    return out


def segments(template_name: str, tokenizer, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``[(text, learned)]``; ``"".join`` of the texts is the full text.
    A conversation ending with a user turn renders as a generation prompt."""
    if template_name == CHAT:
        return _chat_segments(tokenizer, turns)
    if template_name not in TEMPLATES:
        raise ValueError(f"unknown template {template_name!r}; known: {sorted(TEMPLATES)} or {CHAT!r}")
    return _table_segments(TEMPLATES[template_name], tokenizer, turns)


def render_text(template_name: str, tokenizer, turns: list[tuple[str, str]]) -> str:
    """The conversation as one string (``<image>`` placeholders kept, BOS not included)."""
    return "".join(text for text, _ in segments(template_name, tokenizer, turns))


def _adds_prefix_space(tokenizer) -> bool:
    # SentencePiece-style tokenizers (LLaMA/Vicuna) prepend "▁" to every separately encoded string, so
    # " answer" would gain a spurious "▁" token; GPT-2 style BPE needs the space to be kept instead.
    ids = tokenizer.encode("a", add_special_tokens=False)
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith("▁")


def _tokenize(tokenizer, front: np.ndarray, items, add_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    strip = _adds_prefix_space(tokenizer)
    ids: list[np.ndarray] = [front]
    learn: list[np.ndarray] = [np.zeros(len(front), bool)]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None:
        ids.append(np.array([bos], np.int32))
        learn.append(np.zeros(1, bool))
    for item, learned in items:
        if isinstance(item, str):
            if strip and item.startswith(" "):
                item = item[1:]
            if not item:
                continue
            item = np.asarray(tokenizer.encode(item, add_special_tokens=False), np.int32)
        ids.append(item)
        learn.append(np.full(len(item), learned))
    return np.concatenate(ids).astype(np.int32), np.concatenate(learn)


def _encode(template_name, tokenizer, turns, spec: ModelSpec):
    front, items = lay_out(split_images(segments(template_name, tokenizer, turns)), spec)
    # Chat templates render their own BOS (as text) when the model wants one.
    return _tokenize(tokenizer, front, items, add_bos=template_name != CHAT)


def encode_conversation(
    template_name: str,
    tokenizer,
    turns: list[tuple[str, str]],
    model: ModelSpec | int,
    tokens_per_image: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Alternating ``[("user", q), ("assistant", a), ...]`` -> ``(tokens i32[T], learn bool[T])``.

    ``learn`` is True exactly on answer tokens and the end marker closing each answer (the eos for
    ``vicuna_v1``/``tiny``, the separator for ``plain``, the end-of-turn text for ``chat``). BOS comes
    first when the tokenizer has one (after the images in the ``prefix`` layout). Images are laid out as
    ``model`` says (a ``ModelSpec``; an image token id with ``tokens_per_image`` means LLaVA's layout).
    Raises ``BadExample`` for malformed turns.
    """
    _check_turns(turns, "assistant")
    return _encode(template_name, tokenizer, turns, as_spec(model, tokens_per_image))


def encode_prompt(
    template_name: str,
    tokenizer,
    turns: list[tuple[str, str]],
    model: ModelSpec | int,
    tokens_per_image: int | None = None,
) -> np.ndarray:
    """Generation prompt ``i32[T]`` for a conversation ending with a user turn: exactly the tokens that
    ``encode_conversation`` puts before the answer to that turn (given the same images)."""
    _check_turns(turns, "user")
    return _encode(template_name, tokenizer, turns, as_spec(model, tokens_per_image))[0]


def encode_text(tokenizer, text: str, model: ModelSpec) -> np.ndarray:
    """A raw prompt (no template) ``i32[T]``: BOS, then the text with each ``<image>`` laid out as
    ``model`` says; what the family's HF processor makes of the same prompt (``predict``)."""
    front, items = lay_out(split_images([(text, False)]), model)
    return _tokenize(tokenizer, front, items, add_bos=True)[0]


DOCUMENT_KINDS = ("text", "image")


def encode_document(
    tokenizer, items: list[tuple[str, object]], model: ModelSpec
) -> tuple[np.ndarray, np.ndarray]:
    """An interleaved document ``[("text", str) | ("image", anything), ...]`` -> ``(tokens, learn)``.

    BOS, then the items in order (texts separated by a space, images laid out as ``model`` says), then
    the eos token. Every text token and the eos are learned; image, fake and BOS tokens never are.
    Raises ``BadExample("bad_document")`` for a malformed item.
    """
    parts: list = []
    texts = 0
    for i, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != 2 or item[0] not in DOCUMENT_KINDS:
            raise BadExample(
                "bad_document", f"item {i} is not a (kind, value) pair with kind in {DOCUMENT_KINDS}"
            )
        kind, value = item
        if kind == "image":
            parts.append(None)
            continue
        if not isinstance(value, str) or IMAGE in value:
            raise BadExample("bad_document", f"item {i} text must be a string without {IMAGE}")
        parts.append((" " + value if texts else value, True))
        texts += 1
    if tokenizer.eos_token_id is None:
        raise ValueError("documents need a tokenizer with an eos token")
    front, laid = lay_out(parts, model)
    laid.append((np.array([tokenizer.eos_token_id], np.int32), True))
    return _tokenize(tokenizer, front, laid, add_bos=True)
