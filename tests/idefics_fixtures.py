"""Tiny random IdeficsForVisionText2Text checkpoints (+ IdeficsProcessor), built locally, never downloaded."""

from __future__ import annotations

import hf_fixtures
import numpy as np

FAKE_TOKEN = "<fake_token_around_image>"

# name -> build_idefics kwargs. Together: interval 1 and 2, float and vector alphas, with and without the
# resampler, qk layer norms in the cross-attention and in the perceiver, extra vocabulary, tied embeddings.
_VECTOR_I2 = dict(alpha_type="vector", cross_layer_interval=2, num_hidden_layers=4, additional_vocab=True)
IDEFICS_VARIANTS = {
    "float_i1_resampler_tied": dict(tie_word_embeddings=True),
    "vector_i2_plain_addvocab_qk": dict(_VECTOR_I2, use_resampler=False, qk_layer_norms=True),
    "vector_i2_resampler_qk_addvocab": dict(_VECTOR_I2, qk_layer_norms=True, qk_layer_norms_perceiver=True),
}

VISION = dict(
    embed_dim=24,
    image_size=16,
    patch_size=4,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
)


def make_tokenizer():
    """The shared word-level tokenizer with IDEFICS's ``<image>`` and ``<fake_token_around_image>`` last,
    so that with ``additional_vocab`` they are exactly the decoupled extra ids (as in IDEFICS-9B)."""
    tok = hf_fixtures.make_tokenizer(image_token=False)
    tok.add_special_tokens({"additional_special_tokens": [hf_fixtures.IMAGE_TOKEN, FAKE_TOKEN]})
    return tok


def make_processor(tokenizer=None):
    from transformers import IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    image_processor = IdeficsImageProcessorPil(image_size=VISION["image_size"])
    return IdeficsProcessor(image_processor, tokenizer or make_tokenizer(), image_size=VISION["image_size"])


def build_idefics(
    path: str,
    *,
    seed: int = 0,
    alpha_type: str = "float",
    cross_layer_interval: int = 1,
    num_hidden_layers: int = 2,
    use_resampler: bool = True,
    qk_layer_norms: bool = False,
    qk_layer_norms_perceiver: bool = False,
    additional_vocab: bool = False,
    tie_word_embeddings: bool = False,
):
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    hf_fixtures.seed_all(seed)
    tokenizer = make_tokenizer()
    extra = 2 if additional_vocab else 0
    config = IdeficsConfig(
        vocab_size=len(tokenizer) - extra,
        additional_vocab_size=extra,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        alpha_type=alpha_type,
        cross_layer_interval=cross_layer_interval,
        qk_layer_norms=qk_layer_norms,
        use_resampler=use_resampler,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        vision_config=VISION,
        perceiver_config=dict(
            use_resampler=use_resampler,
            resampler_n_latents=5,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=qk_layer_norms_perceiver,
        ),
    )
    model = hf_fixtures.randomize_(IdeficsForVisionText2Text(config).eval(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_cross_attn", "alpha_dense")):  # open the gates wide: tanh ~ +-0.5..1
                p.copy_(
                    torch.sign(torch.randn(p.shape, generator=g)) * (0.5 + torch.rand(p.shape, generator=g))
                )
            elif name.endswith(("ln.weight", "k_layer_norm.weight", "q_layer_norm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pixels_to_ours(pixel_values) -> np.ndarray:
    """HF ``[B, N, C, H, W]`` -> ours ``[B, N, H, W, C]``."""
    return np.asarray(pixel_values).transpose(0, 1, 3, 4, 2)
