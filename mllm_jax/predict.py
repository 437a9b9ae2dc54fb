r"""Run a model on images and a prompt.

    python -m mllm_jax.predict --model=PATH --image=cat.jpg \
        --prompt="USER: <image>\nWhat is this? ASSISTANT:" [--max_new_tokens=32] [--temperature=0] \
        [--top_p=1] [--top_k=0] [--seed=0] [--format=text|json]

PATH is a HF directory (safetensors) or one of our checkpoints (``convert`` output or a training workdir).
Prompt conventions are the model's HF processor's: for LLaVA, one ``<image>`` per ``--image``, in order.
Logs go to stderr, the result to stdout; ``--format=json`` prints ``{"text", "token_ids", "logprobs"}``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model directory or mllm_jax checkpoint directory.")
flags.DEFINE_multi_string("image", [], "Image file; repeat for several images (order = <image> order).")
flags.DEFINE_string("prompt", None, "Prompt text, with the model's image placeholders.")
flags.DEFINE_integer("max_new_tokens", 32, "Maximum number of generated tokens.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy decoding.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")


class UsageError(ValueError):
    """Bad input from the command line: reported in one line, exit code 2."""


def load_images(paths):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--image {path!r}: no such file")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise UsageError(f"--image {path!r}: not a readable image ({e})") from None
    return images


def eos_token_ids(assets: str, hf_config: dict, tokenizer) -> list[int]:
    """EOS ids as HF ``generate`` would use them: generation_config.json, else the (text) config."""
    path = os.path.join(assets, "generation_config.json")
    eos = None
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = hf_config.get("eos_token_id", (hf_config.get("text_config") or {}).get("eos_token_id"))
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def prepare_inputs(family: str, config, assets: str, prompt: str, images):
    """Tokens and pixels through the model's own HF processor (prompt conventions included)."""
    import numpy as np
    from transformers import AutoProcessor, AutoTokenizer

    if family == "llm":
        if images:
            raise UsageError("this is a text-only model: --image is not accepted")
        tokenizer = AutoTokenizer.from_pretrained(assets)
        return tokenizer, tokenizer(prompt, return_tensors="np")["input_ids"][0].tolist(), None
    if family != "llava":
        raise UsageError(f"predict does not support {family!r} models")
    processor = AutoProcessor.from_pretrained(assets)
    tokenizer = processor.tokenizer
    placeholder = processor.image_token
    n_placeholders = prompt.count(placeholder)
    if n_placeholders != len(images):
        raise UsageError(
            f"the prompt has {n_placeholders} {placeholder} placeholder(s) but {len(images)} --image "
            f"file(s) were given; put one {placeholder} where each image goes"
        )
    inputs = processor(images=images or None, text=prompt, return_tensors="np")
    tokens = inputs["input_ids"][0].tolist()
    pixels = None
    if images:
        pixels = np.asarray(inputs["pixel_values"], np.float32).transpose(0, 2, 3, 1)[None]  # [1, N, H, W, C]
        expected = config.tokens_per_image * len(images)
        got = sum(t == config.image_token_id for t in tokens)
        if got != expected:
            raise UsageError(
                f"the processor produced {got} image tokens, the model expects {expected} "
                f"({config.tokens_per_image} per image); check the processor config"
            )
    return tokenizer, tokens, pixels


def predict(
    model_path: str,
    prompt: str,
    image_paths=(),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> dict:
    from mllm_jax import checkpoint, generate, models

    sampling = generate.Sampling(temperature, top_k, top_p)
    try:
        sampling.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    images = load_images(image_paths)
    pretrained, assets = checkpoint.load_any(model_path)
    logging.info("loaded %s model from %s", pretrained.family, model_path)
    tokenizer, tokens, pixels = prepare_inputs(pretrained.family, pretrained.config, assets, prompt, images)
    model = models.build(pretrained.family, pretrained.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    [(ids, logprobs)] = generate.generate(
        model,
        pretrained.params,
        [tokens],
        pixels,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_token_ids(assets, pretrained.hf_config, tokenizer),
        pad_id=pad_id,
        sampling=sampling,
        seed=seed,
    )
    return {"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "logprobs": logprobs}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mllm_jax.hf.common import ConversionError

    if not FLAGS.model or FLAGS.prompt is None:
        print("error: --model and --prompt are required", file=sys.stderr)
        sys.exit(2)
    try:
        result = predict(
            FLAGS.model,
            FLAGS.prompt,
            FLAGS.image,
            FLAGS.max_new_tokens,
            FLAGS.temperature,
            FLAGS.top_p,
            FLAGS.top_k,
            FLAGS.seed,
        )
    except (UsageError, ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.format == "json":
        print(json.dumps(result))
    else:
        print(result["text"])


if __name__ == "__main__":
    app.run(main)
