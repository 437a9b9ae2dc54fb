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


# ---------------------------------------------------------------- stock layouts (issue 19)


def save_bin(path: str, state: dict, shards: int = 1):
    """``state`` as PyTorch ``.bin`` files, as older stock repos ship them: ``pytorch_model.bin``, or
    ``pytorch_model-0000x-of-0000y.bin`` shards with ``pytorch_model.bin.index.json``."""
    import json

    import torch

    os.makedirs(path, exist_ok=True)
    names = sorted(state)
    if shards == 1:
        torch.save({k: state[k].contiguous() for k in names}, os.path.join(path, "pytorch_model.bin"))
        return
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].contiguous() for k in names[i::shards]}
        torch.save(part, os.path.join(path, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def build_dual(path: str, kind: str = "clip", seed: int = 0, as_bin: bool = False):
    """A stock ``CLIPModel`` / ``SiglipModel`` directory (text and vision halves, contrastive heads,
    tokenizer, preprocessor_config.json); ``as_bin``: weights in ``pytorch_model.bin`` only, as
    openai/clip-vit-large-patch14-336 ships them."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    seed_all(seed)
    tokenizer = make_tokenizer(image_token=False)
    v = {k: x for k, x in VISION[kind].items() if k != "model_type"}
    t = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
    t.update(
        vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=3
    )
    cls, config_cls = (CLIPModel, CLIPConfig) if kind == "clip" else (SiglipModel, SiglipConfig)
    model = randomize_(cls(config_cls(text_config=t, vision_config=v)).eval(), seed)
    model.save_pretrained(path)
    if as_bin:
        os.remove(os.path.join(path, "model.safetensors"))
        save_bin(path, model.state_dict())
    tokenizer.save_pretrained(path)
    make_image_processor(kind).save_pretrained(path)
    return path


def build_llama_bin(path: str, seed: int = 0, shards: int = 2, image_token: bool = False):
    """A stock LLaMA directory with ``.bin`` shards only (as lmsys/vicuna-7b-v1.5 ships): its model."""
    model_dir = build_causal_lm(path, seed=seed, image_token=image_token)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(path, name))
    save_bin(path, model.state_dict(), shards)
    return model


def build_llava_repo(
    path: str, clip_dir: str, seed: int = 0, tower_inside: bool = False, stage1: bool = False
):
    """A checkpoint of the original LLaVA repo (haotian-liu/LLaVA): ``LlavaLlamaForCausalLM`` config with
    its ``mm_*`` keys and LLaMA weights (``model.*``, ``lm_head``) plus ``model.mm_projector.0/2`` in
    ``.bin`` shards; ``tower_inside``: the CLIP tower saved in it too
    (``model.vision_tower.vision_tower.*``); ``stage1``: only ``mm_projector.bin`` and config.json, as its
    pretraining stage saves them. Returns ``(config dict, {key: tensor})`` of what was written."""
    import json

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    seed_all(seed)
    tokenizer = make_tokenizer(image_token=False)
    t = text_config(tokenizer)
    llm = randomize_(AutoModelForCausalLM.from_config(AutoConfig.for_model(t.pop("model_type"), **t)), seed)
    vision = AutoModel.from_pretrained(clip_dir).vision_model
    width = vision.config.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    projector = {
        "model.mm_projector.0.weight": 0.2 * torch.randn(t["hidden_size"], width, generator=g),
        "model.mm_projector.0.bias": 0.2 * torch.randn(t["hidden_size"], generator=g),
        "model.mm_projector.2.weight": 0.2 * torch.randn(t["hidden_size"], t["hidden_size"], generator=g),
        "model.mm_projector.2.bias": 0.2 * torch.randn(t["hidden_size"], generator=g),
    }
    config = dict(
        llm.config.to_dict(),
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        mm_hidden_size=width,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tune_mm_mlp_adapter=stage1,
    )
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if stage1:
        torch.save(projector, os.path.join(path, "mm_projector.bin"))
        return config, projector
    state = dict(llm.state_dict(), **projector)
    if tower_inside:
        state.update(
            {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in vision.state_dict().items()}
        )
    save_bin(path, state, shards=2)
    tokenizer.save_pretrained(path)
    return config, state
