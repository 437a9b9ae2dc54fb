"""Tiny HF models with random weights, built locally (never downloaded) and saved with save_pretrained.

Each builder returns the directory of a complete HF checkpoint: safetensors, config, tokenizer and
processor, as a user's downloaded directory would be.
"""

from __future__ import annotations

import os

import numpy as np

WORDS = (
    "a an the is are of in on to and what which where how many color shape this image picture "
    "red green blue yellow purple orange white black circle square triangle star left right top bottom "
    "one two three four USER ASSISTANT : ? . , describe there"
).split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"


def make_tokenizer(image_token: bool = True):
    """A word-level fast tokenizer (BOS prepended) with an ``<image>`` special token at the end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if image_token:
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def seed_all(seed: int):
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def randomize_(model, seed: int, scale: float = 0.2):
    """Non-trivial random values for every tensor (HF zero-inits biases; parity needs them nonzero)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(
                (
                    "layernorm.weight",
                    "layer_norm1.weight",
                    "layer_norm2.weight",
                    "norm.weight",
                    "layrnorm.weight",
                    "layernorm.weight",
                )
            ):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


_TOWER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=16, patch_size=4)
VISION = {
    "clip": dict(_TOWER, model_type="clip_vision_model", num_hidden_layers=3),
    "siglip": dict(_TOWER, model_type="siglip_vision_model", num_hidden_layers=2),
}
# what the tiny text models of each kind add to the sizes they share
_TEXT = {
    "llama": dict(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128),
}


def text_config(tokenizer, model_type: str = "llama", **overrides) -> dict:
    """A tiny HF text config over ``tokenizer``: OPT, or (any other ``model_type``) the LLaMA family's."""
    base = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return (
        base | {"model_type": model_type} | ids | _TEXT["opt" if model_type == "opt" else "llama"] | overrides
    )


def build_llava(
    path: str, *, vision="clip", feature_layer=-2, strategy="default", text=None, seed=0, projector_act="gelu"
):
    """A tiny LlavaForConditionalGeneration + LlavaProcessor saved at ``path``."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    seed_all(seed)
    tokenizer = make_tokenizer()
    v = dict(VISION[vision])
    seq_len = image_seq_length(v, strategy)
    t = text_config(tokenizer, **(text or {}))
    text_cfg = AutoConfig.for_model(t.pop("model_type"), **t)
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(v.pop("model_type"), **v),
        text_config=text_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=projector_act,
        image_seq_length=seq_len,
        tie_word_embeddings=text_cfg.tie_word_embeddings,
    )
    model = randomize_(LlavaForConditionalGeneration(config).eval(), seed)
    model.save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=make_image_processor(vision),
        tokenizer=tokenizer,
        patch_size=v["patch_size"],
        vision_feature_select_strategy=strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if vision == "clip" else 0,
    )
    processor.save_pretrained(path)
    return path


def image_seq_length(vision: dict, strategy: str) -> int:
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    has_cls = vision.get("model_type", "clip_vision_model") == "clip_vision_model"
    return patches + int(has_cls) - int(strategy == "default")


def make_image_processor(vision: str):
    size = VISION[vision]["image_size"]
    if vision == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size})


def build_vision(path: str, vision="clip", seed=0, **overrides):
    from transformers import AutoConfig, AutoModel

    seed_all(seed)
    v = dict(VISION[vision], **overrides)
    model = randomize_(AutoModel.from_config(AutoConfig.for_model(v.pop("model_type"), **v)).eval(), seed)
    model.save_pretrained(path)
    make_image_processor(vision).save_pretrained(path)
    return path


def build_causal_lm(path: str, seed=0, image_token=True, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    seed_all(seed)
    tokenizer = make_tokenizer(image_token)
    t = text_config(tokenizer, **overrides)
    model = randomize_(
        AutoModelForCausalLM.from_config(AutoConfig.for_model(t.pop("model_type"), **t)).eval(), seed
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_image(seed: int, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))


def save_image(directory: str, seed: int, size=(20, 24)) -> str:
    path = os.path.join(directory, f"img{seed}.png")
    random_image(seed, size).save(path)
    return path


def convert(path: str, module):
    """``(hf_config, tensors, config, params)``: the HF checkpoint at ``path`` through the conversion
    ``module`` (read + normalize + rules, the calls ``mllm_jax.hf`` makes)."""
    from mllm_jax.hf import common

    hf_config, tensors = common.read_config(path), common.read_safetensors(path)
    config = module.config_from_hf(hf_config)
    params = common.hf_to_params(common.normalize_keys(tensors, module.ALIASES), module.rules(config), path)
    return hf_config, tensors, config, params


def export_exact(out: str, module, config, params, tensors: dict, hf_config: dict):
    """Export ``params`` through ``module`` to ``out`` (safetensors + config.json merged over
    ``hf_config``), asserting every tensor is ``tensors``' to the bit: names, dtypes, shapes, bytes."""
    import json

    from mllm_jax.hf import common

    exported = common.params_to_hf(params, module.rules(config), f"export to {out}")
    assert sorted(exported) == sorted(tensors)
    for k, v in tensors.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        assert exported[k].tobytes() == v.tobytes(), k
    common.write_safetensors(out, exported)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(common.merge_config(hf_config, module.config_to_hf(config, hf_config)), f)


def built_once(tmp_path_factory, prefix: str, build):
    """``get(name)``: ``build(path, seed, name)`` for a fresh directory, run on the first ``get`` of each
    name only (seeds 0, 1, ... in that order): fixtures build each tiny checkpoint once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build(str(tmp_path_factory.mktemp(f"{prefix}_{name}")), len(cache), name)
        return cache[name]

    return get
