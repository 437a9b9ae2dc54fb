"""``bench --packing``: a LLaVA train step on ragged, LLaVA-like examples, padded one per row and
packed (data/packing.py), timed side by side on the same examples.

The lengths (``LengthModel``) imitate LLaVA-1.5's instruction mix at its 2048-token context, then are
scaled to the bench's ``--seq``: a conversation's text is log-normal (median ``text_median`` tokens,
shape ``text_sigma``: a few dozen to over a thousand tokens), clipped to what fits beside the image;
``text_only`` of the examples have no image (the mix's 40K ShareGPT conversations of 665K); the others
carry one image of the model's ``tokens_per_image`` tokens. The first ``prompt_share`` of an example's
text is its prompt, the rest the answers it learns (target tokens). These are modelling choices stated
in docs/benchmarks.md, not statistics measured here (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_jax.data import packing
from mllm_jax.data.layouts import ModelSpec
from mllm_jax.models.layers import AttentionKernel
from mllm_jax.models.mllm import Llava
from mllm_jax.training import step

LLAVA_CONTEXT = 2048  # LLaVA-1.5's max_length, the scale the length model is written at


@dataclasses.dataclass(frozen=True)
class LengthModel:
    text_median: float = 120.0  # tokens of text per conversation at LLAVA_CONTEXT (median)
    text_sigma: float = 1.0  # log-normal shape: ~5% above 620 tokens, ~1% above 1230
    text_min: int = 12
    text_only: float = 40 / 665  # ShareGPT's share of the 665K mix
    prompt_share: float = 0.3  # of the text: the prompt (no loss); the rest is answers


def draw_examples(lengths: LengthModel, n: int, seq: int, config, seed: int = 0) -> list[dict]:
    """``n`` encoded examples (the pipeline's per-example arrays, padded to ``seq``)."""
    rng = np.random.default_rng(seed)
    p, image_id, v = config.tokens_per_image, config.image_token_id, config.vision
    scale = seq / LLAVA_CONTEXT
    out = []
    for _ in range(n):
        has_image = rng.random() >= lengths.text_only
        room = seq - 1 - (p if has_image else 0)
        text = int(np.clip(rng.lognormal(np.log(lengths.text_median), lengths.text_sigma) * scale, 1, room))
        text = max(text, min(lengths.text_min, room))
        tokens = np.concatenate(
            [[1], np.full(p if has_image else 0, image_id), rng.integers(2, image_id, size=text)]
        ).astype(np.int32)
        learn = np.zeros(len(tokens), bool)
        learn[len(tokens) - text + int(lengths.prompt_share * text) :] = True
        n_tok = len(tokens)
        example = {
            "tokens": np.zeros(seq, np.int32),
            "targets": np.zeros(seq, np.int32),
            "loss_mask": np.zeros(seq, np.float32),
            "attention_mask": np.zeros(seq, np.int32),
            "images": np.zeros((1, v.image_size, v.image_size, 3), np.float32),
        }
        example["tokens"][:n_tok] = tokens
        example["targets"][: n_tok - 1] = tokens[1:]
        example["loss_mask"][: n_tok - 1] = learn[1:]
        example["attention_mask"][:n_tok] = 1
        if has_image:
            example["images"][0] = rng.normal(size=example["images"].shape[1:])
        out.append(example)
    return out


def unpacked_batches(examples: list[dict], batch: int, steps: int) -> list[dict]:
    rows = [e | {"segment_ids": e["attention_mask"], "positions": np.arange(len(e["tokens"]), dtype=np.int32)}
            for e in examples]  # fmt: skip
    return [_stack(rows[i * batch : (i + 1) * batch]) for i in range(steps)]


def packed_batches(examples: list[dict], batch: int, steps: int, seq: int, spec: ModelSpec) -> list[dict]:
    """The same stream through the pipeline's packer (``data.packing=True``)."""
    slots = packing.row_images(seq, 1, seq // spec.image_tokens, spec)  # as many images as tokens allow
    source = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(itertools.islice(packing.PackIterDataset(source, seq, slots, 0, spec), batch * steps))
    if len(rows) < batch * steps:
        raise ValueError(f"{len(examples)} examples fill only {len(rows)} packed rows")
    return [_stack(rows[i * batch : (i + 1) * batch]) for i in range(steps)]


def _stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0] if k in step.BATCH_KEYS}


def stepper(config, batches: list[dict], dtype: str, attention: AttentionKernel):
    """``one(i)``: the train step on ``batches[i]`` (compiled and warmed up here), blocking until done."""
    model = Llava(config, jnp.dtype(dtype), attention=attention)
    first = batches[0]
    init = jax.jit(model.init)(
        jax.random.key(0), jnp.asarray(first["tokens"][:1]), jnp.asarray(first["images"][:1])
    )
    params = nn.meta.unbox(init["params"])
    tx = optax.adamw(1e-4)
    step_fn = jax.jit(step.make_train_step(model, tx, lambda s: 1e-4, 1), donate_argnums=0)
    box = {"state": {"trainable": params, "frozen": {}, "opt_state": tx.init(params), "step": jnp.asarray(0)}}
    on_device = [jax.device_put(b) for b in batches]

    def one(i: int):
        box["state"], metrics = step_fn(box["state"], on_device[i], jax.random.key(0))
        jax.block_until_ready(metrics)

    one(0)  # compile and warm up
    return one


def summary(batches: list[dict], seconds: float) -> dict:
    targets = sum(float(b["loss_mask"].sum()) for b in batches)
    real = sum(float((b["attention_mask"] > 0).sum()) for b in batches)
    total = sum(b["attention_mask"].size for b in batches)
    return {
        "step_time_s": seconds / len(batches),
        "target_tokens_per_sec": targets / seconds,
        "tokens_per_sec": real / seconds,
        "padding_fraction": 1 - real / total,
        "examples_per_step": sum(int(b["segment_ids"].max(1).sum()) for b in batches) / len(batches),
        "images_per_row": batches[0]["images"].shape[1],
    }


def run(
    config, batch: int, seq: int, steps: int, dtype: str, attention: AttentionKernel, seed: int = 0
) -> dict:
    """Both ways on one stream of examples, their steps alternated: ``{"unpacked": ..., "packed": ...,
    "target_tokens_per_sec_ratio"}``."""
    lengths = LengthModel()
    spec = ModelSpec(config.image_token_id, config.tokens_per_image)
    # enough examples for the packed rows (each row holds at most seq // 2 examples)
    examples = draw_examples(lengths, batch * steps * max(8, seq // 32), seq, config, seed)
    ways = {
        "unpacked": unpacked_batches(examples, batch, steps),
        "packed": packed_batches(examples, batch, steps, seq, spec),
    }
    steppers = {way: stepper(config, batches, dtype, attention) for way, batches in ways.items()}
    seconds = dict.fromkeys(ways, 0.0)
    for i in range(steps):  # alternated, so a change in the machine's load hits both alike
        for way, one in steppers.items():
            t0 = time.perf_counter()
            one(i)
            seconds[way] += time.perf_counter() - t0
    unpacked, packed = (summary(ways[w], seconds[w]) for w in ("unpacked", "packed"))
    return {
        "length_model": dataclasses.asdict(lengths),
        "unpacked": unpacked,
        "packed": packed,
        "target_tokens_per_sec_ratio": packed["target_tokens_per_sec"] / unpacked["target_tokens_per_sec"],
    }
