"""Benchmark a LLaVA train step and decoding; optionally transformers' PyTorch model side by side.

    python -m mllm_jax.bench [--size=small] [--batch=8] [--seq=256] [--steps=8] [--compare=torch]
    python -m mllm_jax.bench --packing [--size=tiny] [--batch=8] [--seq=256] [--steps=8]

Prints one JSON object: train-step time (median over steps after compilation), tokens/s, model FLOPs
per step (analytic, as MaxText counts them), MFU against the device peak (on CPU: the measured f32
rate of a 2048x2048 jitted matmul in this process), decode tokens/s, and with ``--compare=torch`` the
same figures for ``LlavaForConditionalGeneration`` (forward + backward + AdamW; greedy ``generate``)
on the same inputs, and the ratios. ``--packing``: the train step on ragged LLaVA-like examples, one per
row and packed (training/pack_bench.py), target tokens/s of both and their ratio.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from mllm_jax import families
from mllm_jax.inference import generate
from mllm_jax.models import flops, layers
from mllm_jax.models.layers import AttentionKernel
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.mllm import Llava, LlavaConfig
from mllm_jax.models.projector import ProjectorConfig
from mllm_jax.models.vit import VitConfig
from mllm_jax.training import pack_bench, step

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "small", ["tiny", "small", "medium", "large"], "Model size (see SIZES).")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("seq", 256, "Tokens per sequence (image tokens included).")
flags.DEFINE_integer("steps", 8, "Timed train steps (after 2 warm-up steps).")
flags.DEFINE_integer("decode_tokens", 32, "Tokens generated per sequence in the decode benchmark.")
flags.DEFINE_integer("decode_batch", 4, "Sequences decoded at once.")
flags.DEFINE_enum("compare", "none", ["none", "torch"], "Also run transformers' PyTorch model.")
flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay f32; torch: autocast)."
)
flags.DEFINE_bool("packing", False, "Time ragged LLaVA-like examples padded and packed (pack_bench.py).")
flags.DEFINE_enum(
    "attention",
    "xla",
    ["xla", "cudnn", "splash"],
    "Attention kernel (layers.ATTENTION_CHOICES; splash: TPU only).",
)

# size -> (vision tower, LLM) sizes, in the order of VISION_FIELDS and LLM_FIELDS
VISION_FIELDS = ("hidden_size", "num_layers", "num_heads", "image_size", "patch_size")
LLM_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
SIZES = {
    "tiny": ((64, 2, 4, 32, 8), (128, 2, 4, 2, 256, 512)),
    "small": ((256, 4, 4, 64, 8), (512, 4, 8, 8, 1408, 8192)),
    "medium": ((512, 6, 8, 112, 14), (1024, 8, 16, 8, 2816, 32000)),
    # ~1.1B LLM + a CLIP-L-sized tower: the accelerator size
    "large": ((1024, 24, 16, 224, 14), (2048, 16, 16, 8, 5632, 32000)),
}


def bench_config(size: str):

    vision_sizes, llm_sizes = SIZES[size]
    v = dict(zip(VISION_FIELDS, vision_sizes, strict=True))
    vision = VitConfig(intermediate_size=4 * v["hidden_size"], **v)
    t = dict(zip(LLM_FIELDS, llm_sizes, strict=True))
    llm = LlmConfig(head_dim=t["hidden_size"] // t["num_heads"], max_positions=4096, **t)
    projector = ProjectorConfig(vision.hidden_size, llm.hidden_size)
    return LlavaConfig(vision, projector, llm, image_token_id=llm.vocab_size - 1, vision_feature_layers=(-2,))


def make_batch(config, batch: int, seq: int, seed: int = 0) -> dict:
    """One image per sequence: BOS, the image tokens, then random text; every text token is a target."""
    rng = np.random.default_rng(seed)
    n_img = config.tokens_per_image
    if seq <= n_img + 2:
        raise ValueError(f"--seq {seq} leaves no room for text after {n_img} image tokens")
    tokens = rng.integers(2, config.image_token_id, size=(batch, seq)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[:, 1 : 1 + n_img] = config.image_token_id
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    loss_mask = np.zeros((batch, seq), np.float32)
    loss_mask[:, n_img:-1] = 1.0
    v = config.vision
    return {
        "images": rng.normal(size=(batch, 1, v.image_size, v.image_size, 3)).astype(np.float32),
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": np.ones((batch, seq), np.int32),
    }


def _median_time(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jax(
    config, batch: dict, steps: int, decode_tokens: int, decode_batch: int, dtype: str, attention=None
) -> dict:
    """``attention``: a ``layers.AttentionKernel`` (default: XLA's)."""
    model = Llava(config, jnp.dtype(dtype), attention=attention or AttentionKernel())
    params = nn.meta.unbox(
        jax.jit(model.init)(
            jax.random.key(0), jnp.asarray(batch["tokens"][:1]), jnp.asarray(batch["images"][:1])
        )["params"]
    )
    tx = optax.adamw(1e-4)
    step_fn = jax.jit(step.make_train_step(model, tx, lambda s: 1e-4, 1), donate_argnums=0)
    state = {
        "trainable": params,
        "frozen": {},
        "opt_state": jax.jit(tx.init)(params),
        "step": jnp.asarray(0, jnp.int32),
    }
    device_batch = jax.device_put(batch)
    box = {"state": state}

    def one_step():
        box["state"], metrics = step_fn(box["state"], device_batch, jax.random.key(0))
        jax.block_until_ready(metrics)

    step_time = _median_time(one_step, steps)
    params = box["state"]["trainable"]
    prompts = [row[: config.tokens_per_image + 8].tolist() for row in batch["tokens"][:decode_batch]]
    images = batch["images"][:decode_batch]

    def decode():
        generate.generate(model, params, prompts, images, max_new_tokens=decode_tokens, eos_ids=[])

    decode_time = _median_time(decode, 3, warmup=1)
    return {"step_time_s": step_time, "decode_tokens_per_sec": decode_batch * decode_tokens / decode_time}


def bench_torch(config, batch: dict, steps: int, decode_tokens: int, decode_batch: int, dtype: str) -> dict:
    import contextlib

    import torch
    from transformers import LlavaConfig as HfLlavaConfig
    from transformers import LlavaForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = families.get("llava").config_to_hf(config)
    hf_config = HfLlavaConfig(**{k: v for k, v in d.items() if k != "architectures"})
    model = LlavaForConditionalGeneration(hf_config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.tensor(batch["tokens"], dtype=torch.long, device=device)
    pixels = torch.tensor(batch["images"][:, 0].transpose(0, 3, 1, 2), device=device)
    # HF shifts labels itself: label[t] is learned where our loss_mask[t - 1] (target = token t) is set
    learned = torch.roll(torch.tensor(batch["loss_mask"], device=device), 1, dims=1) > 0
    labels = torch.where(learned, tokens, torch.full_like(tokens, -100))
    # mixed precision as usual in PyTorch: f32 master weights, bf16 autocast compute
    autocast = (
        (lambda: torch.autocast(device, dtype=torch.bfloat16))
        if dtype == "bfloat16"
        else contextlib.nullcontext
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one_step():
        with autocast():
            loss = model(input_ids=tokens, pixel_values=pixels, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    step_time = _median_time(one_step, steps)
    model.eval()
    n = config.tokens_per_image + 8
    prompt = tokens[:decode_batch, :n]

    def decode():
        with torch.no_grad(), autocast():
            model.generate(
                input_ids=prompt,
                pixel_values=pixels[:decode_batch],
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=decode_tokens,
                min_new_tokens=decode_tokens,
            )
        sync()

    decode_time = _median_time(decode, 3, warmup=1)
    return {
        "step_time_s": step_time,
        "decode_tokens_per_sec": decode_batch * decode_tokens / decode_time,
        "torch_threads": torch.get_num_threads(),
        "torch_device": device,
        "torch_version": torch.__version__,
    }


def main(argv):
    del argv
    try:
        kernel = layers.attention_kernel(FLAGS.attention)
    except ValueError as e:
        raise app.UsageError(f"--attention: {e}") from None
    config = bench_config(FLAGS.size)
    if FLAGS.packing:
        result = pack_bench.run(config, FLAGS.batch, FLAGS.seq, FLAGS.steps, FLAGS.dtype, kernel)
        meta = {"size": FLAGS.size, "batch": FLAGS.batch, "seq": FLAGS.seq, "steps": FLAGS.steps}
        print(json.dumps({**meta, "device": jax.devices()[0].device_kind, "dtype": FLAGS.dtype, **result}))
        return
    batch = make_batch(config, FLAGS.batch, FLAGS.seq)
    flops_per_step = FLAGS.batch * families.get("llava").flops_per_sequence(config, FLAGS.seq)
    peak = flops.peak_flops_per_device() * jax.device_count()
    logging.info("benchmarking %s LLaVA (%d x %d tokens)", FLAGS.size, FLAGS.batch, FLAGS.seq)
    ours = bench_jax(config, batch, FLAGS.steps, FLAGS.decode_tokens, FLAGS.decode_batch, FLAGS.dtype, kernel)
    tokens = FLAGS.batch * FLAGS.seq
    result = {
        "size": FLAGS.size,
        "batch": FLAGS.batch,
        "seq": FLAGS.seq,
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "dtype": FLAGS.dtype,
        "attention": FLAGS.attention,
        "jax_version": jax.__version__,
        "peak_flops": peak,
        "model_flops_per_step": flops_per_step,
        "config": {"vision": dataclasses.asdict(config.vision), "llm": dataclasses.asdict(config.llm)},
        "jax": {
            **ours,
            "tokens_per_sec": tokens / ours["step_time_s"],
            "mfu": flops_per_step / ours["step_time_s"] / peak,
        },
    }
    if FLAGS.compare == "torch":
        theirs = bench_torch(config, batch, FLAGS.steps, FLAGS.decode_tokens, FLAGS.decode_batch, FLAGS.dtype)
        result["torch"] = {
            **theirs,
            "tokens_per_sec": tokens / theirs["step_time_s"],
            "mfu": flops_per_step / theirs["step_time_s"] / peak,
        }
        result["speedup_train"] = theirs["step_time_s"] / ours["step_time_s"]
        result["speedup_decode"] = ours["decode_tokens_per_sec"] / theirs["decode_tokens_per_sec"]
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
