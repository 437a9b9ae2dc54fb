"""Convert between HF transformers directories and our checkpoints.

    python -m mllm_jax.convert --from_hf=HF_DIR --to=CKPT_DIR     # HF -> orbax checkpoint + our config
    python -m mllm_jax.convert --from=CKPT_DIR --to_hf=HF_DIR     # newest checkpoint -> HF directory
                               [--step=N]
    python -m mllm_jax.convert --from_hf=BIN_DIR --to_safetensors=HF_DIR   # .bin-only HF dir, once
    python -m mllm_jax.convert --from_llava_repo=DIR --vision=CLIP_DIR --to_hf=HF_DIR [--llm=LLM_DIR]
                               # the original LLaVA repo's checkpoint -> HF LLaVA directory

CKPT_DIR may be a training workdir: its newest checkpoint is exported. HF -> ours -> HF is bit-exact,
and tokenizer/processor files travel along.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from mllm_jax import paths
from mllm_jax.errors import ConversionError
from mllm_jax.families import store

FLAGS = flags.FLAGS
flags.DEFINE_string("from_hf", None, "HF model directory to import.")
flags.DEFINE_string("to", None, "Checkpoint directory to write (with --from_hf).")
flags.DEFINE_string("from", None, "Our checkpoint directory (or training workdir) to export.")
flags.DEFINE_string("to_hf", None, "HF directory to write (with --from).")
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: newest).")
flags.DEFINE_string(
    "to_safetensors", None, "With --from_hf: convert its pytorch_model*.bin files once into this new HF dir."
)
flags.DEFINE_string("from_llava_repo", None, "A checkpoint of the original LLaVA repo to convert (--to_hf).")
flags.DEFINE_string(
    "vision", None, "With --from_llava_repo: its CLIP tower's HF dir (CLIPModel or CLIPVisionModel)."
)
flags.DEFINE_string(
    "llm", None, "With --from_llava_repo of a stage-1 output (mm_projector.bin only): the base LLM dir."
)


def import_hf(hf_dir: str, ckpt_dir: str):
    pretrained = store.load_pretrained(hf_dir)
    store.save_model(
        ckpt_dir,
        pretrained.family,
        pretrained.config,
        pretrained.params,
        hf_config=pretrained.hf_config,
        assets_from=hf_dir,
    )
    return pretrained


def export_hf(ckpt_dir: str, hf_dir: str, step: int | None = None):
    if not store.is_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"--from {ckpt_dir!r}: not an mllm_jax checkpoint (no {store.MODEL_CONFIG})")
    model = store.load_model(ckpt_dir, step)
    assets = store.assets_dir(ckpt_dir)
    store.save_pretrained(
        hf_dir,
        model.family,
        model.config,
        model.params,
        hf_config=model.hf_config or None,
        assets_dir=store.local_assets(ckpt_dir) if paths.isdir(assets) else None,
    )
    return model


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    src_ours = getattr(FLAGS, "from")
    names = ("from_hf", "to", "from", "to_hf", "to_safetensors", "from_llava_repo", "vision", "llm")
    given = {k for k in names if getattr(FLAGS, k)}
    try:
        if given == {"from_hf", "to_safetensors"}:
            written = store.bin_to_safetensors(FLAGS.from_hf, FLAGS.to_safetensors)
            logging.info("wrote %s to %s", ", ".join(written), FLAGS.to_safetensors)
        elif given in ({"from_llava_repo", "vision", "to_hf"}, {"from_llava_repo", "vision", "to_hf", "llm"}):
            store.from_llava_repo(FLAGS.from_llava_repo, FLAGS.vision, FLAGS.to_hf, FLAGS.llm)
            logging.info("converted %s to the HF LLaVA directory %s", FLAGS.from_llava_repo, FLAGS.to_hf)
        elif given == {"from_hf", "to"}:
            model = import_hf(FLAGS.from_hf, FLAGS.to)
            logging.info("imported %s (%s) into %s", FLAGS.from_hf, model.family, FLAGS.to)
        elif given == {"from", "to_hf"}:
            model = export_hf(src_ours, FLAGS.to_hf, FLAGS.step)
            logging.info("exported %s (%s) to %s", src_ours, model.family, FLAGS.to_hf)
        else:
            raise ConversionError(
                "use one of --from_hf=HF_DIR --to=CKPT_DIR, --from=CKPT_DIR --to_hf=HF_DIR, "
                "--from_hf=BIN_DIR --to_safetensors=HF_DIR, "
                "--from_llava_repo=DIR --vision=CLIP_DIR --to_hf=HF_DIR"
            )
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
