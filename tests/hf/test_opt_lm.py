"""Stand-alone OPTForCausalLM against transformers: logits with left padding, export, round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from blip2_fixtures import build_opt
from hf_fixtures import convert, export_exact
from transformers import AutoModelForCausalLM

from mllm_jax.hf import opt as hf_opt
from mllm_jax.hf.common import hf_to_params, normalize_keys
from mllm_jax.models.opt import Opt

# opt-350m's shape (narrow word embeddings with project_in/out, post-LN) and a bias-free, untied,
# final-norm-free variant: every switch of OptConfig is exercised against HF.
VARIANTS = {
    "proj_post_ln": dict(word_embed_proj_dim=16, do_layer_norm_before=False),
    "untied_no_bias": dict(tie_word_embeddings=False, enable_bias=False, _remove_final_layer_norm=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_opt_matches_transformers_and_round_trips(name, tmp_path):
    path = build_opt(str(tmp_path / name), seed=7, **VARIANTS[name])
    hf_config, tensors, config, params = convert(path, hf_opt)
    assert config.projects == (name == "proj_post_ln")

    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 40, size=(2, 10))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding: HF derives positions from the mask, so must we
    model = Opt(config)

    @jax.jit
    def logits_fn(params, tokens, mask):
        embeds = model.apply({"params": params}, tokens, method="embed")
        return model.apply({"params": params}, embeds, None, mask)[0]

    ours = np.asarray(logits_fn(params, jnp.asarray(tokens), jnp.asarray(mask)))
    torch_model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.std(ref) > 0.1
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], ref[keep], atol=1e-4, rtol=0)

    out = str(tmp_path / "export")
    export_exact(out, hf_opt, config, params, tensors, hf_config)  # architectures: the original's
    again, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(again).__name__ == hf_opt.ARCHITECTURE
    assert hf_opt.config_from_hf(hf_opt.config_to_hf(config)) == config
    with torch.no_grad():
        np.testing.assert_allclose(
            again.eval()(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy(),
            ref,
            atol=1e-6,
            rtol=0,
        )


def test_legacy_decoder_prefix_is_accepted(tmp_path):
    path = build_opt(str(tmp_path / "legacy"), seed=1)
    _, tensors, config, a = convert(path, hf_opt)
    legacy = {k.removeprefix("model."): v for k, v in tensors.items()}  # as saved from OPTModel
    b = hf_to_params(normalize_keys(legacy, hf_opt.ALIASES), hf_opt.rules(config), "legacy")
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
