r"""Run a model on images and a prompt.

    python -m mllm_jax.predict --model=PATH --image=cat.jpg \
        --prompt="USER: <image>\nWhat is this? ASSISTANT:" [--max_new_tokens=32] [--temperature=0] \
        [--top_p=1] [--top_k=0] [--seed=0] [--num_beams=1] [--format=text|json] \
        [--explain=OUT.png [--explain_layer=L]]

PATH is a HF directory (safetensors) or one of our checkpoints (``convert`` output or a training workdir).
Prompt conventions are the model's HF processor's: for LLaVA and IDEFICS (Flamingo), one ``<image>`` per
``--image``, in order (IDEFICS: as IdeficsProcessor's interleaved list ``[text, image, text, ...]``);
BLIP-2 / InstructBLIP take one image whose query tokens go in front of the prompt.
Logs go to stderr, the result to stdout; ``--format=json`` prints ``{"text", "token_ids", "logprobs"}``
(with ``--num_beams`` > 1, beam search as transformers' ``generate(num_beams=k)``: ``{"text", "token_ids",
"score"}``, the beam's length-normalised log-probability). ``--explain`` writes the input images with a
heatmap of where the answer's tokens attended (``inference/explain.py``: LLaVA's image tokens, IDEFICS's
gated cross-attention, BLIP-2's Q-Former weighted by the LLM's attention to its queries), averaged over
layers and heads, or of one layer with ``--explain_layer``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from mllm_jax import families
from mllm_jax.errors import ConversionError, UsageError
from mllm_jax.families import store
from mllm_jax.inference import beam, explain, generate
from mllm_jax.inference.inputs import eos_token_ids, load_images, prepare_inputs

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
    flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1 = greedy or sampled).")
    flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
    flags.DEFINE_string(
        "explain", None, "Write the images with an attention heatmap of the answer here (PNG)."
    )
    flags.DEFINE_integer("explain_layer", None, "With --explain: one LLM layer's map (default: the mean).")


def predict(
    model_path: str,
    prompt: str,
    image_paths=(),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    num_beams: int = 1,
    explain_path: str | None = None,
    explain_layer: int | None = None,
) -> dict:
    sampling = generate.Sampling(temperature, top_k, top_p)
    try:
        sampling.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1 or (num_beams > 1 and sampling != generate.Sampling()):
        raise UsageError(f"--num_beams={num_beams}: beam search is >= 1 beams, without sampling flags")
    images = load_images(image_paths)
    pretrained, assets = store.load_any(model_path)
    logging.info("loaded %s model from %s", pretrained.family, model_path)
    inputs = prepare_inputs(pretrained.family, pretrained.config, assets, prompt, images)
    tokenizer = inputs.tokenizer
    model = families.build(pretrained.family, inputs.config or pretrained.config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = eos_token_ids(assets, pretrained.hf_config, tokenizer)
    if explain_path:  # a model --explain cannot draw is refused before decoding
        explain.check(model, inputs.tokens, inputs.pixels)
    if num_beams > 1:
        try:
            ids, score = beam.beam_search(
                model, pretrained.params, inputs.tokens, inputs.pixels, num_beams=num_beams,
                max_new_tokens=max_new_tokens, eos_ids=eos_ids, embed_kwargs=inputs.embed_kwargs,
            )  # fmt: skip
        except ValueError as e:
            raise UsageError(str(e)) from None
        result = {"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "score": score}
        return _explained(result, explain_path, explain_layer, model, pretrained.params, inputs)
    [(ids, logprobs)] = generate.generate(
        model,
        pretrained.params,
        [inputs.tokens],
        inputs.pixels,
        embed_kwargs=inputs.embed_kwargs,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        sampling=sampling,
        seed=seed,
    )
    result = {"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "logprobs": logprobs}
    return _explained(result, explain_path, explain_layer, model, pretrained.params, inputs)


def _explained(result: dict, path, layer, model, params, inputs) -> dict:
    """With ``path``: the attention heatmap of the answer written there (``result["explain"]``)."""
    if not path:
        return result
    attention = explain.explain(
        model, params, inputs.tokens, result["token_ids"], inputs.pixels, layer, inputs.embed_kwargs
    )
    explain.save_heatmaps(path, inputs.pixels, attention)
    return {**result, "explain": path}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
            FLAGS.num_beams,
            FLAGS.explain,
            FLAGS.explain_layer,
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
