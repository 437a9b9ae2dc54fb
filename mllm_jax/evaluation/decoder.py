"""The one context every evaluator takes: a model ready to answer batches of prompts greedily.

Built once per evaluation (by ``stage.evaluate_stage`` in training, by ``family_hooks`` for
``python -m mllm_jax.evaluate``) instead of passing model, params, tokenizer, image spec, model spec,
template, mesh and rules to every function. Shape letters: B prompts of a batch, N images of a prompt
(a clip's frames included), H x W x C pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mllm_jax.data import templates
from mllm_jax.inference import generate


def pad_rows(rows: int, prompts: list, pixels_BxNxHxWxC, embed_kwargs: dict) -> tuple[list, Any, dict]:
    """Every input grown to ``rows`` rows with copies of its last row, so a short last batch reuses the
    full batches' compilation (their results are dropped)."""
    extra = rows - len(prompts)
    grow = lambda x: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])  # noqa: E731
    pixels = None if pixels_BxNxHxWxC is None else grow(pixels_BxNxHxWxC)
    return prompts + [prompts[-1]] * extra, pixels, {k: grow(v) for k, v in embed_kwargs.items()}


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A model, its params and tokenizer, and how to ask it: greedy decoding of at most
    ``max_new_tokens`` in batches of ``batch_size`` (fewer examples make one smaller batch)."""

    model: Any
    params: Any
    tokenizer: Any
    image_spec: Any = None  # transforms.ImageSpec: a raw image -> f32[H, W, C] (synthetic tasks)
    model_spec: Any = None  # layouts.ModelSpec: how the template's image slots are laid out
    template: str | None = None  # conversation template name (data/templates.py)
    batch_size: int = 128
    max_new_tokens: int = 3
    mesh: Any = None  # decode sharded over it as training is (generate.generate); None: one device
    rules: Any = None  # the run's sharding.rules(...); None: sharding.RULES
    eos_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS

    def replace(self, **changes) -> Decoder:
        return dataclasses.replace(self, **changes)

    def placed(self) -> Decoder:
        """The params on the mesh once, not per batch (as they are already for training's)."""
        if self.mesh is None:
            return self
        return self.replace(params=generate.place_params(self.model, self.params, self.mesh, self.rules))

    def rows(self, num_examples: int) -> int:
        return max(1, min(self.batch_size, num_examples))

    def decode_chunk(
        self, prompts: list[list[int]], pixels_BxNxHxWxC, rows: int, embed_kwargs: dict | None = None
    ) -> list[str]:
        """Greedy texts (special tokens dropped) for one chunk of at most ``rows`` prompts and their
        pixels (None: no images) and ``embed_kwargs`` arrays ``[B, ...]`` (InstructBLIP's Q-Former text)."""
        n = len(prompts)
        prompts, pixels, embed_kwargs = pad_rows(rows, prompts, pixels_BxNxHxWxC, embed_kwargs or {})
        tok = self.tokenizer
        results = generate.generate(
            self.model,
            self.params,
            prompts,
            pixels,
            max_new_tokens=self.max_new_tokens,
            eos_ids=[tok.eos_token_id] if self.eos_ids is None else list(self.eos_ids),
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            embed_kwargs=embed_kwargs,
            mesh=self.mesh,
            rules=self.rules,
        )
        return [tok.decode(ids, skip_special_tokens=True) for ids, _ in results[:n]]

    def answer(
        self,
        items: Sequence,
        turns: Callable[[Any], list[tuple[str, str]]],
        pixels: Callable[[Any], np.ndarray],
        reply: Callable[[str], str] = str.strip,
    ) -> list[str]:
        """``reply`` of the generated text for each item, asked as the conversation ``turns(item)``
        (ending with the user's turn) in the template, with the images ``pixels(item)``: f32[N, H, W, C]."""
        rows = self.rows(len(items))
        answers = []
        for start in range(0, len(items), rows):
            chunk = items[start : start + rows]
            prompts = [
                templates.encode_prompt(self.template, self.tokenizer, turns(it), self.model_spec).tolist()
                for it in chunk
            ]
            pixels_BxNxHxWxC = np.stack([pixels(it) for it in chunk])
            answers += [reply(text) for text in self.decode_chunk(prompts, pixels_BxNxHxWxC, rows)]
        return answers

    def prompt_text(self, turns: list[tuple[str, str]]) -> str:
        """The prompt of ``turns`` as text, for prediction files."""
        return templates.render_text(self.template, self.tokenizer, turns)
