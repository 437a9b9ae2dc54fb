r"""Run a model on images and a prompt.

    python -m mllm_jax.predict --model=PATH --image=cat.jpg \
        --prompt="USER: <image>\nWhat is this? ASSISTANT:" [--max_new_tokens=32] [--temperature=0] \
        [--top_p=1] [--top_k=0] [--seed=0] [--format=text|json]

PATH is a HF directory (safetensors) or one of our checkpoints (``convert`` output or a training workdir).
Prompt conventions are the model's HF processor's: for LLaVA and IDEFICS (Flamingo), one ``<image>`` per
``--image``, in order (IDEFICS: as IdeficsProcessor's interleaved list ``[text, image, text, ...]``);
BLIP-2 / InstructBLIP take one image whose query tokens go in front of the prompt.
Logs go to stderr, the result to stdout; ``--format=json`` prints ``{"text", "token_ids", "logprobs"}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from mllm_jax.errors import UsageError

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program, so tools with flags of the same names (``evaluate``) can
    import this module."""
    flags.DEFINE_string("model", None, "HF model directory or mllm_jax checkpoint directory.")
    flags.DEFINE_multi_string("image", [], "Image file; repeat for several images (order = <image> order).")
    flags.DEFINE_string("prompt", None, "Prompt text, with the model's image placeholders.")
    flags.DEFINE_integer("max_new_tokens", 32, "Maximum number of generated tokens.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy decoding.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
    flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")


@dataclasses.dataclass
class Inputs:
    tokenizer: object
    tokens: list[int]
    pixels: np.ndarray | None = None  # [1, N, H, W, C]
    embed_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. InstructBLIP's Q-Former text
    config: object = None  # the model config completed with what the tokenizer knows (None: as loaded)


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


@functools.lru_cache(maxsize=8)
def _processor(assets: str):
    """The saved HF processor, loaded once per directory: ``evaluate`` prepares many examples."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(assets, trust_remote_code=False)


@functools.lru_cache(maxsize=8)
def _tokenizer(assets: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets, trust_remote_code=False)


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


def _check_placeholders(prompt: str, placeholder: str, images) -> None:
    n = prompt.count(placeholder)
    if n != len(images):
        raise UsageError(
            f"the prompt has {n} {placeholder} placeholder(s) but {len(images)} --image "
            f"file(s) were given; put one {placeholder} where each image goes"
        )


def _to_nhwc(pixel_values) -> np.ndarray:
    return np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1)[None]  # [1, N, H, W, C]


def _text_only(config, assets, prompt, images) -> Inputs:

    if images:
        raise UsageError("this is a text-only model: --image is not accepted")
    tokenizer = _tokenizer(assets)
    return Inputs(tokenizer, tokenizer(prompt, return_tensors="np")["input_ids"][0].tolist())


def _llava(config, assets, prompt, images) -> Inputs:
    """LlavaProcessor: each ``<image>`` becomes the image's feature tokens, in place."""

    processor = _processor(assets)
    _check_placeholders(prompt, processor.image_token, images)
    inputs = processor(images=images or None, text=prompt, return_tensors="np")
    tokens = inputs["input_ids"][0].tolist()
    if not images:
        return Inputs(processor.tokenizer, tokens)
    expected = config.tokens_per_image * len(images)
    got = sum(t == config.image_token_id for t in tokens)
    if got != expected:
        raise UsageError(
            f"the processor produced {got} image tokens, the model expects {expected} "
            f"({config.tokens_per_image} per image); check the processor config"
        )
    return Inputs(processor.tokenizer, tokens, _to_nhwc(inputs["pixel_values"]))


def _blip2(config, assets, prompt, images) -> Inputs:
    """Blip2Processor / InstructBlipProcessor: one image; its query tokens go in front of the prompt
    (the prompt needs no placeholder); InstructBLIP's Q-Former also reads the prompt."""

    if len(images) != 1:
        raise UsageError(f"BLIP-2 takes exactly one --image, got {len(images)}")
    processor = _processor(assets)
    prompt = prompt.replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in prompt else prompt
    inputs = processor(images=images, text=prompt, return_tensors="np")
    extra = {}
    if "qformer_input_ids" in inputs:
        extra = {
            "qformer_tokens_BxT": np.asarray(inputs["qformer_input_ids"], np.int32),
            "qformer_mask_BxT": np.asarray(inputs["qformer_attention_mask"], np.int32),
        }
    return Inputs(
        processor.tokenizer, inputs["input_ids"][0].tolist(), _to_nhwc(inputs["pixel_values"]), extra
    )


def _idefics(config, assets, prompt, images) -> Inputs:
    """IdeficsProcessor's interleaved layout: the prompt split at each ``<image>`` is the list
    ``[text, image, text, ...]`` the processor takes; the images are resized as its image processor
    does. (IdeficsProcessor itself needs torch tensors, which are no runtime dependency here.)"""

    from mllm_jax.data import layouts, templates
    from mllm_jax.training import wiring

    _check_placeholders(prompt, IMAGE_PLACEHOLDER, images)
    tokenizer = _tokenizer(assets)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PLACEHOLDER, "<fake_token_around_image>")}
    if tokenizer.unk_token_id in ids.values():
        raise UsageError(f"{assets}: the tokenizer lacks IDEFICS's tokens {sorted(ids)}")
    # which image each token sees follows from the image tokens and the end of document (IdeficsProcessor)
    config = dataclasses.replace(
        config, image_token_id=ids[IMAGE_PLACEHOLDER], eod_token_id=tokenizer.eos_token_id
    )
    spec = layouts.ModelSpec(
        config.image_token_id, 1, layout="idefics", around_token_id=ids["<fake_token_around_image>"]
    )
    tokens = templates.encode_text(tokenizer, prompt, spec).tolist()
    if not images:
        return Inputs(tokenizer, tokens, config=config)
    image_spec = wiring.image_spec_of_assets(assets)
    return Inputs(tokenizer, tokens, np.stack([image_spec(im) for im in images])[None], config=config)


IMAGE_PLACEHOLDER = "<image>"
# family -> (config, assets dir, prompt, PIL images) -> Inputs
PREPARERS = {"llm": _text_only, "opt": _text_only, "llava": _llava, "blip2": _blip2, "idefics": _idefics}


def prepare_inputs(family: str, config, assets: str, prompt: str, images) -> Inputs:
    """Tokens and pixels as the model's own HF processor prepares them (prompt conventions included)."""
    if family not in PREPARERS:
        raise UsageError(f"predict does not support {family!r} models")
    if getattr(config, "frames_per_media", 1) > 1:  # the HF processors lay out one image per <image>
        raise UsageError(
            f"predict does not support clips merged into one media item (frames_per_clip="
            f"{config.frames_per_media}); use evaluate --task=synthetic_video"
        )
    return PREPARERS[family](config, assets, prompt, images)


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
    from mllm_jax import models
    from mllm_jax.inference import generate
    from mllm_jax.training import checkpoint

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
    inputs = prepare_inputs(pretrained.family, pretrained.config, assets, prompt, images)
    tokenizer = inputs.tokenizer
    model = models.build(pretrained.family, inputs.config or pretrained.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    [(ids, logprobs)] = generate.generate(
        model,
        pretrained.params,
        [inputs.tokens],
        inputs.pixels,
        embed_kwargs=inputs.embed_kwargs,
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
    from mllm_jax.errors import ConversionError

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
    define_flags()
    app.run(main)
