"""LLaMA-Adapter (multimodal, single stage): a frozen-or-not LLaMA whose top ``adapter_layers`` layers
attend to ``adapter_len`` learnable prompts through zero-initialised per-head gates, the projected global
CLIP feature of the image added to every prompt (``models/llama_adapter.py``). A sample's image is one
plain ``<image>`` token in the text. There is no transformers class: a HF export is the base as a
``LlamaForCausalLM`` directory plus the adapter and tower beside it (``hf/llama_adapter.py``)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mllm_jax import schema
from mllm_jax.data import templates
from mllm_jax.data.layouts import ModelSpec
from mllm_jax.errors import UsageError
from mllm_jax.families import base
from mllm_jax.families.trainable import ModelSettings, TrainableFamily, llm_sizes
from mllm_jax.hf import common
from mllm_jax.hf import llama_adapter as hf_adapter
from mllm_jax.models import flops
from mllm_jax.models.layers import AttentionKernel
from mllm_jax.models.llama_adapter import LlamaAdapter, LlamaAdapterConfig
from mllm_jax.models.llm import LlmConfig
from mllm_jax.models.vit import VitConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaAdapterSettings(ModelSettings):
    family: str = "llama_adapter"
    adapter_len: int = 10  # K adaption prompts per adapted layer
    adapter_layers: int = 30  # the top L decoder layers that get prompts (LLaMA-Adapter on 7B: 30)
    gate_init: float = 0.0  # the gates' start (LLaMA-Adapter: 0, the base model exactly)
    # the global image feature (models/llama_adapter.py POOLINGS): "class" (CLIP's pooled), "mean" or
    # "max" (over the patches), "concat" (class and mean), "concat_max" (class, mean and max)
    pooling: str = "class"

    def check(self, where: str):
        super().check(where)
        schema.positive(self.adapter_len, where + "adapter_len")
        schema.positive(self.adapter_layers, where + "adapter_layers")


class AssetsProcessor:
    """What a run saves for inference: the tokenizer and CLIP's image processor (no HF processor class
    joins them for this family)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def save_pretrained(self, directory: str):
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


class LlamaAdapterFamily(TrainableFamily):
    name = "llama_adapter"
    config_cls = LlamaAdapterConfig
    settings_cls = LlamaAdapterSettings
    module_cls = LlamaAdapter
    hf_types = {}  # no transformers class: see hf/llama_adapter.py
    writes_hf_dir = True
    starts_from_parts = True
    special_tokens = (base.IMAGE_TOKEN,)
    image_mode = "crop"  # CLIPImageProcessor
    grows_vocab = True  # <image> gets a row of the (frozen) table, as LLaVA's
    nested_text_config = False  # the HF config is the decoder's own
    reads_media = True  # the image reaches the layers as media (the prompts), not as token features
    cannot_pack = "its adaption prompts carry one image's global feature for the whole row"

    def build(self, config, dtype=jnp.float32, remat="none", scan_layers=False, attention=AttentionKernel()):
        # adapted and plain layers differ: no layer scan for this family
        return LlamaAdapter(config, dtype=dtype, remat=remat, attention=attention)

    def scans_layers(self, module) -> bool:
        return False

    # -- sizing from config.model

    def scratch(self, m: LlamaAdapterSettings, tokenizer) -> LlamaAdapterConfig:
        return self.from_parts(m, VitConfig(**m.vision), LlmConfig(**llm_sizes(m, tokenizer)), tokenizer)

    def from_parts(self, m: LlamaAdapterSettings, vision: VitConfig, llm: LlmConfig, tokenizer):
        return LlamaAdapterConfig(
            vision,
            llm,
            adapter_len=m.adapter_len,
            adapter_layers=m.adapter_layers,
            gate_init=m.gate_init,
            pooling=m.pooling,
            image_token_id=base.token_id(tokenizer, base.IMAGE_TOKEN),
        )

    def processor(self, config, tokenizer, image_processor, qformer_tokenizer=None):
        return AssetsProcessor(tokenizer, image_processor)

    def model_spec(self, config: LlamaAdapterConfig, tokenizer) -> ModelSpec:
        return ModelSpec(config.image_token_id, 1)

    def flops_per_sequence(self, c: LlamaAdapterConfig, seq_len: int, images: int = 1) -> float:
        """The decoder and the tower (counted as trained: an upper bound), the prompts' keys and values
        and every token's attention to them in the adapted layers, and the feature projection."""
        lc = c.llm
        kv = 2 * lc.hidden_size * lc.num_kv_heads * lc.head_dim * c.adapter_len
        scores = 2 * seq_len * c.adapter_len * lc.num_heads * lc.head_dim
        adapter = (
            6.0 * c.adapter_layers * (kv + scores) + 6.0 * c.vision.hidden_size * lc.hidden_size * images
        )
        return flops.decoder_flops(lc, seq_len) + flops.vision_flops(c.vision, images) + adapter

    # -- HF interop: a LlamaForCausalLM directory plus the adapter's files

    def config_to_hf(self, config: LlamaAdapterConfig, base_config: dict | None = None) -> dict:
        base_config = {k: v for k, v in (base_config or {}).items() if k != "vision_config"}
        return self._merged(
            base_config, hf_adapter.config_to_hf(config, base_config.get("model_type", "llama"))
        )

    def owns_hf_dir(self, model_dir: str) -> bool:
        return hf_adapter.is_adapter_dir(model_dir)

    def read_hf_dir(self, model_dir: str) -> base.Pretrained:
        config, params = hf_adapter.read(model_dir)
        return base.Pretrained(self.name, config, params, common.read_config(model_dir))

    def write_hf_dir(self, out_dir: str, config, params, hf_config: dict, assets_dir: str | None = None):
        hf_adapter.write(out_dir, config, params, hf_config, assets_dir)

    # -- inference

    def prepare_inputs(self, config: LlamaAdapterConfig, assets: str, prompt: str, images) -> base.Inputs:
        """The tokenizer's ids with one ``<image>`` token where the image goes, and CLIP's pixels."""
        base.check_placeholders(prompt, base.IMAGE_TOKEN, images)
        if len(images) > 1:
            raise UsageError(f"LLaMA-Adapter reads one image per prompt, got {len(images)} --image files")
        tokenizer = base.load_tokenizer(assets)
        image_token_id = tokenizer.convert_tokens_to_ids(base.IMAGE_TOKEN)
        if images and image_token_id in (None, tokenizer.unk_token_id):
            raise UsageError(f"{assets}: the tokenizer has no {base.IMAGE_TOKEN} token")
        tokens = templates.encode_text(tokenizer, prompt, ModelSpec(image_token_id, 1)).tolist()
        if not images:
            return base.Inputs(tokenizer, tokens)
        config = dataclasses.replace(config, image_token_id=image_token_id)
        pixels = np.stack([base.image_spec_of_assets(assets)(im) for im in images])[None]
        return base.Inputs(tokenizer, tokens, pixels, config=config)


FAMILY = LlamaAdapterFamily()
