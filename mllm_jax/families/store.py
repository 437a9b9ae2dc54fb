"""Model directories, ours and HF's: what ``predict``, ``evaluate``, ``convert`` and
``config.model.init`` read, and what a run or ``convert`` writes.

Ours (a training workdir has the same layout, so every reader accepts either):

```
DIR/
  mllm_config.json      {"family": ..., "config": {...}}     our model config (frozen dataclasses)
  hf/                   config.json of the HF model it came from (export base), tokenizer, processor
  checkpoints/<step>/   orbax items: "params" (and, from training, optimizer state, data state, ...)
```

A HF directory is config.json + safetensors; its architecture (or ``model_type``) names the family and
conversion module that read it (``Family.hf_types``). A ``.bin``-only directory, and the original LLaVA
repository's checkpoints, are converted once by explicit opt-in (``bin_to_safetensors``,
``from_llava_repo``: the ``convert`` command).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp

from mllm_jax import hf, paths
from mllm_jax.errors import ConversionError
from mllm_jax.families import FAMILIES, Pretrained, get
from mllm_jax.hf import common, llava_repo, pytorch_bin
from mllm_jax.models import params as param_tree
from mllm_jax.models import scan

MODEL_CONFIG = "mllm_config.json"
ASSETS = "hf"
CHECKPOINTS = "checkpoints"
LORA = "lora"  # item of a mid-LoRA-stage step: the factors (see mllm_jax/training/lora.py)


# ---------------------------------------------------------------- HF directories


def architecture(hf_config: dict):
    """``(family, conversion module)`` of a HF config: by architecture name first (one model_type may
    have several HF classes), then by model_type."""
    by_name = {name: (f, m) for f in FAMILIES.values() for name, m in f.hf_types.items()}
    for name in hf_config.get("architectures") or ():
        if name in by_name:
            return by_name[name]
    model_type = hf_config.get("model_type")
    if model_type not in by_name:
        raise ConversionError(
            f"model_type {model_type!r} ({hf_config.get('architectures')}) is not supported; "
            f"supported: {sorted(by_name)}"
        )
    return by_name[model_type]


def load_pretrained(model_dir: str) -> Pretrained:
    """Read a HF directory (config.json + safetensors) into our params (numpy, HF dtypes kept)."""
    model_dir = paths.local_dir(model_dir)
    hf_config = common.read_config(model_dir)
    if llava_repo.is_llava_repo(hf_config):
        raise ConversionError(
            f"{model_dir}: a checkpoint of the original LLaVA repo ({llava_repo.ARCHITECTURE}); convert it "
            f"once: python -m mllm_jax.convert --from_llava_repo={model_dir} --vision=CLIP_DIR --to_hf=OUT"
        )
    for owner in FAMILIES.values():
        if owner.owns_hf_dir(model_dir):  # a HF model with the family's own files beside it
            return owner.read_hf_dir(model_dir)
    family, module = architecture(hf_config)
    config = family.config_from_hf(hf_config, module)
    drop = family.tied_keys if family.tied_keys and family.decoder_config(config).tie_embeddings else ()
    params = hf.read_params(model_dir, module, config, drop)
    base = getattr(module, "base_config", None)  # a part read alone (CLIPModel's vision half): its config
    hf_config = base(hf_config) if base else hf_config
    return Pretrained(family.name, config, family.complete_params(config, params, module), hf_config)


def bin_to_safetensors(src: str, out: str) -> list[str]:
    """``convert --from_hf=DIR --to_safetensors=OUT``: a ``.bin``-only HF directory, once, into one that
    every other command reads (weights through PyTorch's restricted loader; config and tokenizer /
    processor files copied). Returns the weight files written."""
    src = paths.local_dir(src)
    with paths.Staged(out) as local:
        written = pytorch_bin.to_safetensors(src, local)
        hf.copy_assets(src, local)
    return written


def from_llava_repo(src: str, vision: str, out: str, llm: str | None = None):
    """``convert --from_llava_repo=DIR --vision=CLIP_DIR --to_hf=OUT [--llm=DIR]``: the original LLaVA
    repo's checkpoint as a HF LLaVA directory (``hf/llava_repo.py``); returns its config."""
    if not paths.isfile(paths.join(vision, "preprocessor_config.json")):
        raise ConversionError(
            f"--vision={vision}: no preprocessor_config.json (the image processor's settings, which stock "
            "CLIP repos carry beside config.json)"
        )
    src, vision = paths.local_dir(src), paths.local_dir(vision)
    with paths.Staged(out) as local:
        return llava_repo.convert(src, vision, local, paths.local_dir(llm) if llm else None)


def save_pretrained(
    out_dir: str, family: str, config, params, hf_config: dict | None = None, assets_dir: str | None = None
):
    """Write a directory that ``transformers`` loads with ``from_pretrained`` (``hf.write``), converting
    by the architecture the family's config exports as."""
    d = get(family).config_to_hf(config, hf_config)
    with paths.Staged(out_dir) as local:
        if get(family).writes_hf_dir:
            return get(family).write_hf_dir(local, config, params, d, assets_dir)
        hf.write(local, architecture(d)[1], config, params, d, assets_dir)


# ---------------------------------------------------------------- ours


def is_checkpoint(path: str) -> bool:
    return paths.isfile(paths.join(path, MODEL_CONFIG))


def assets_dir(path: str) -> str:
    return paths.join(path, ASSETS)


def local_assets(path: str) -> str:
    """The assets of our model dir ``path`` as a local directory (copied once from a bucket)."""
    return paths.local_dir(assets_dir(path))


def write_model_config(directory: str, family: str, config):
    d = {"family": family, "config": get(family).config_to_dict(config)}
    paths.write_text(paths.join(directory, MODEL_CONFIG), json.dumps(d, indent=2))


def read_model_config(directory: str) -> tuple[str, object]:
    d = json.loads(paths.read_text(paths.join(directory, MODEL_CONFIG)))
    family = d["family"]
    if family not in FAMILIES:
        raise ValueError(f"{directory}: unknown model family {family!r}")
    return family, FAMILIES[family].config_from_dict(d["config"])


def manager(
    directory: str, max_to_keep: int | None = None, async_save: bool = False, write: bool = True
) -> ocp.CheckpointManager:
    """Readers (``write=False``) create nothing on disk; writers also clear unfinished steps left by a
    killed run (orbax would only clear a step's temporary dir when that same step is saved again)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=write,
        cleanup_tmp_directories=write,
    )
    return ocp.CheckpointManager(paths.resolve(paths.join(directory, CHECKPOINTS)), options=options)


def latest_step(directory: str) -> int | None:
    """Newest complete step under ``directory/checkpoints`` (unfinished writes are not steps), or None."""
    if not paths.isdir(paths.join(directory, CHECKPOINTS)):
        return None
    with manager(directory, write=False) as m:
        return m.latest_step()


def save_model(
    directory: str,
    family: str,
    config,
    params,
    *,
    hf_config: dict | None = None,
    assets_from: str | None = None,
    step: int = 0,
):
    """Save params as an orbax checkpoint with our config and the HF assets beside it."""
    write_model_config(directory, family, config)
    with paths.Staged(assets_dir(directory)) as assets:
        paths.makedirs(assets)
        if assets_from and paths.resolve(assets_from) != paths.resolve(assets_dir(directory)):
            hf.copy_assets(paths.local_dir(assets_from), assets)
        if hf_config is not None:
            text = json.dumps(hf_config, indent=2, sort_keys=True)
            paths.write_text(paths.join(assets, "config.json"), text)
    with manager(directory) as m:
        m.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        m.wait_until_finished()


def load_model(directory: str, step: int | None = None) -> Pretrained:
    """Params of the newest (or given) step, our config and the HF config the model came from."""
    family, config = read_model_config(directory)
    with manager(directory, write=False) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no complete checkpoint under {CHECKPOINTS}/")
        restored = m.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
        params = restored["params"]
        if paths.isdir(paths.join(str(m.directory), str(step), LORA)):  # mid-LoRA-stage step
            extra = m.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), lora=ocp.args.StandardRestore())
            )
            params = _merge_lora(params, extra[LORA], extra["meta"][LORA])
    hf_config_path = paths.join(assets_dir(directory), "config.json")
    hf_config = json.loads(paths.read_text(hf_config_path)) if paths.exists(hf_config_path) else {}
    if scan.is_stacked(params):  # trained with scan_layers: hand out the standard per-layer layout
        params = scan.unstack_layers(params)
    return Pretrained(family, config, params, hf_config)


def _merge_lora(params, factors, meta: dict):
    """What the stage would export had it ended here: ``W + alpha/rank * A @ B``, as numpy."""
    merged = param_tree.merge_lora(params, factors, float(meta["alpha"]) / int(meta["rank"]))
    return jax.tree.map(np.asarray, merged)


def load_any(path: str) -> tuple[Pretrained, str]:
    """A model from our checkpoint dir or a HF dir (local or in a bucket); returns it with its assets
    directory (local: a bucket's is copied)."""
    if not paths.isdir(paths.check(path, "--model")):
        raise FileNotFoundError(f"--model {path!r}: no such directory")
    if is_checkpoint(path):
        return load_model(path), local_assets(path)
    return load_pretrained(path), paths.local_dir(path)  # the copy load_pretrained read
