"""The original LLaVA repository's checkpoints (haotian-liu/LLaVA, ``LlavaLlamaForCausalLM``) -> a HF
``LlavaForConditionalGeneration`` directory, mapped as transformers' ``convert_llava_weights_to_hf.py``
maps them:

| LLaVA repo                                   | HF LLaVA                                     |
|----------------------------------------------|----------------------------------------------|
| ``model.mm_projector.0`` / ``.2``            | ``multi_modal_projector.linear_1`` / ``_2``  |
| ``model.vision_tower.vision_tower.<clip>``   | ``vision_tower.<clip>`` (when saved inside)  |
| ``model.*``, ``lm_head.weight``              | ``language_model.model.*``, ``.lm_head``     |
| ``mm_vision_select_layer``                   | ``vision_feature_layer``                     |
| ``mm_vision_select_feature`` patch/cls_patch | ``vision_feature_select_strategy`` default/full |

``<image>`` (and ``<pad>`` where the tokenizer has none) join the tokenizer and the vocabulary grows to
a multiple of 64, the new rows at the mean of the old ones. A stage-1 output (``mm_projector.bin`` and
config.json only) takes the LLM from ``llm_dir``; the tower's sizes always come from ``vision_dir``
(the LLaVA config names it only: ``mm_vision_tower``).
"""

from __future__ import annotations

import json
import os

import numpy as np

from mllm_jax.errors import ConversionError
from mllm_jax.hf import clip_dual, common, llava, pytorch_bin

ARCHITECTURE = "LlavaLlamaForCausalLM"
PROJECTOR = "model.mm_projector."
TOWER = "model.vision_tower.vision_tower."
STRATEGIES = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
# LLaVA-repo config keys with no HF LLaVA meaning (besides every mm_* key)
_REPO_ONLY = (
    "architectures", "_name_or_path", "transformers_version", "use_mm_proj", "image_aspect_ratio",
    "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower",
    "tokenizer_padding_side", "tokenizer_model_max_length", "use_cache",
)  # fmt: skip


def is_llava_repo(d: dict) -> bool:
    return "mm_vision_tower" in d or ARCHITECTURE in (d.get("architectures") or ())


def _check(d: dict, src: str):
    if not is_llava_repo(d):
        raise ConversionError(f"--from_llava_repo={src}: not a LLaVA-repo checkpoint (no mm_vision_tower)")
    if d.get("architectures") not in (None, [ARCHITECTURE]):
        raise ConversionError(f"--from_llava_repo: {d['architectures']} not supported; only {ARCHITECTURE}")
    if d.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ConversionError(
            f"--from_llava_repo: mm_projector_type {d.get('mm_projector_type', 'linear')!r}: HF LLaVA has "
            "the 2-layer GELU projector (mlp2x_gelu) only"
        )
    if d.get("mm_use_im_start_end"):
        raise ConversionError("--from_llava_repo: mm_use_im_start_end=true has no HF LLaVA equivalent")
    if d.get("mm_vision_select_feature", "patch") not in STRATEGIES:
        raise ConversionError(
            f"--from_llava_repo: mm_vision_select_feature must be one of {list(STRATEGIES)}"
        )


def _vision(vision_dir: str, d: dict) -> dict:
    v = common.read_config(vision_dir)
    v = clip_dual.vision_config(v) if v.get("model_type") in clip_dual.VISION_TYPES else v
    if v.get("model_type") != "clip_vision_model":
        raise ConversionError(f"--vision={vision_dir}: a CLIP model is needed, not {v.get('model_type')!r}")
    if "mm_hidden_size" in d and v.get("hidden_size") != d["mm_hidden_size"]:
        raise ConversionError(
            f"--vision={vision_dir}: hidden_size {v.get('hidden_size')} != the checkpoint's mm_hidden_size "
            f"{d['mm_hidden_size']} (it was trained on {d.get('mm_vision_tower')})"
        )
    return v


def _grow(table: np.ndarray, vocab: int, axis: int) -> np.ndarray:
    extra = vocab - table.shape[axis]
    mean = table.astype(np.float32).mean(axis, keepdims=True).astype(table.dtype)
    return np.concatenate([table, np.repeat(mean, extra, axis=axis)], axis=axis)


def convert(src: str, vision_dir: str, out: str, llm_dir: str | None = None):
    """Write the HF LLaVA directory ``out`` (weights, config, tokenizer, processor)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    d = common.read_config(src)
    _check(d, src)
    repo = pytorch_bin.read_weights(src)
    projector = {k[len(PROJECTOR) :]: v for k, v in repo.items() if k.startswith(PROJECTOR)}
    tower = {k[len(TOWER) :]: v for k, v in repo.items() if k.startswith(TOWER)}
    text = {k: v for k, v in repo.items() if not k.startswith((PROJECTOR, TOWER))}
    if sorted(projector) != ["0.bias", "0.weight", "2.bias", "2.weight"]:
        raise ConversionError(f"--from_llava_repo={src}: no {PROJECTOR}0/2 weights (mm_projector.bin)")
    if not text:
        if not llm_dir:
            raise ConversionError(
                f"--from_llava_repo={src} holds the projector only (stage 1): pass --llm=DIR, its base LLM"
            )
        text = pytorch_bin.read_weights(llm_dir)
    elif llm_dir:
        raise ConversionError(f"--llm: {src} holds its own LLM weights already")
    if not tower:
        tower = pytorch_bin.read_weights(vision_dir)
    tower = {k: v for k, v in common.normalize_keys(tower, clip_dual.ALIASES).items()}
    tower = {k: v for k, v in tower.items() if not k.startswith(clip_dual.SKIP)}

    tok_dir = src if common.has_any_file(src, common.TOKENIZER_FILES) else llm_dir
    if not tok_dir:
        raise ConversionError(
            f"--from_llava_repo={src}: no tokenizer files ({', '.join(common.TOKENIZER_FILES)})"
        )
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    text_config = {k: v for k, v in d.items() if not (k.startswith("mm_") or k in _REPO_ONLY)}
    text_config.update(model_type="llama", pad_token_id=tokenizer.pad_token_id)
    vocab = text_config["vocab_size"]
    if len(tokenizer) > vocab:
        vocab = -(-len(tokenizer) // 64) * 64
        text["model.embed_tokens.weight"] = _grow(text["model.embed_tokens.weight"], vocab, 0)
        if "lm_head.weight" in text:
            text["lm_head.weight"] = _grow(text["lm_head.weight"], vocab, 0)
        text_config["vocab_size"] = vocab

    vision_config = _vision(vision_dir, d)
    strategy = STRATEGIES[d.get("mm_vision_select_feature", "patch")]
    patches = (vision_config.get("image_size", 224) // vision_config.get("patch_size", 32)) ** 2
    hf_config = dict(
        model_type="llava",
        architectures=["LlavaForConditionalGeneration"],
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=d.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        image_seq_length=patches + int(strategy == "full"),
        tie_word_embeddings=text_config.get("tie_word_embeddings", False),
    )
    tensors = {f"vision_tower.{k}": v for k, v in tower.items()}
    tensors.update({f"language_model.{k}": v for k, v in text.items()})
    for i, j in ((0, 1), (2, 2)):
        for p in ("weight", "bias"):
            tensors[f"multi_modal_projector.linear_{j}.{p}"] = projector[f"{i}.{p}"]
    # every tensor must be exactly what HF LLaVA's layout asks for (no more, no fewer)
    config = llava.config_from_hf(hf_config)
    drop = ("language_model.lm_head.weight",) if config.llm.tie_embeddings else ()
    kept = {k: v for k, v in tensors.items() if k not in drop}
    common.hf_to_params(
        common.normalize_keys(kept, llava.ALIASES), llava.rules(config), f"--from_llava_repo={src}"
    )

    os.makedirs(out, exist_ok=True)
    common.write_safetensors(out, kept)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(vision_dir, trust_remote_code=False),
        tokenizer=tokenizer,
        patch_size=vision_config.get("patch_size", 32),
        vision_feature_select_strategy=strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token
    )
    processor.save_pretrained(out)
    return config
