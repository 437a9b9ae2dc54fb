"""BLIP-2 / InstructBLIP parity with transformers: logits, export, bit-exact round trip, greedy decoding.

The conversion modules are called directly (read_safetensors + normalize_keys + hf_to_params), so
these tests do not depend on the ``mllm_jax.hf`` dispatch table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from blip2_fixtures import NUM_QUERY_TOKENS, QFORMER_VOCAB, build_blip2
from hf_fixtures import built_once, convert, export_exact
from transformers import AutoConfig, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

from mllm_jax.hf import blip2 as hf_blip2
from mllm_jax.hf import instructblip as hf_instructblip
from mllm_jax.inference.generate import generate
from mllm_jax.models.blip2 import Blip2
from mllm_jax.models.eva import EvaTower
from mllm_jax.models.opt import OptConfig

# name -> build_blip2 kwargs. Together: OPT and LLaMA text, cross-attention in every layer and every
# other layer, tied and untied OPT, a BLIP-2 Q-Former carrying the (unused) text FFN, and InstructBLIP
# on both decoders.
VARIANTS = {
    "opt_f2": dict(text="opt"),
    "llama_f1_textffn": dict(text="llama", cross_attention_frequency=1, qformer_text_input=True),
    "instruct_llama_f2": dict(text="llama", instruct=True),
    "instruct_opt_f1_untied": dict(
        text="opt", instruct=True, cross_attention_frequency=1, text_overrides=dict(tie_word_embeddings=False)
    ),
}
PROMPT_LEN = 8  # text tokens after the image tokens and BOS


class Checkpoint:
    """One built HF checkpoint, its conversion, the torch model and reference inputs/logits."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self.instruct = VARIANTS[name].get("instruct", False)
        self.module = hf_instructblip if self.instruct else hf_blip2
        self.torch_cls = (
            InstructBlipForConditionalGeneration if self.instruct else Blip2ForConditionalGeneration
        )
        self.hf_config, self.tensors, self.config, self.params = convert(path, self.module)
        self.model = Blip2(self.config)
        self.torch_model = self.torch_cls.from_pretrained(path).eval()
        rng = np.random.default_rng(len(name))
        self.pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
        q = NUM_QUERY_TOKENS
        text = rng.integers(4, 40, size=(2, PROMPT_LEN))
        self.tokens = np.concatenate(
            [np.full((2, q), self.config.image_token_id), np.ones((2, 1), int), text], 1
        )
        self.mask = np.ones_like(self.tokens)
        self.mask[1, -3:] = 0  # right padding in the second sample
        self.qformer_tokens = rng.integers(1, QFORMER_VOCAB, size=(2, 5))
        self.qformer_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        self.ref_logits = self.torch_logits(self.torch_model)

    def torch_inputs(self):
        kw = dict(
            pixel_values=torch.tensor(self.pixels),
            input_ids=torch.tensor(self.tokens),
            attention_mask=torch.tensor(self.mask),
        )
        if self.instruct:
            kw.update(
                qformer_input_ids=torch.tensor(self.qformer_tokens),
                qformer_attention_mask=torch.tensor(self.qformer_mask),
            )
        return kw

    def torch_logits(self, model):
        with torch.no_grad():
            return model(**self.torch_inputs()).logits.numpy()

    def our_logits(self):
        extra = (
            {
                "qformer_tokens_BxT": jnp.asarray(self.qformer_tokens),
                "qformer_mask_BxT": jnp.asarray(self.qformer_mask),
            }
            if self.instruct
            else {}
        )
        fn = jax.jit(lambda p, t, i, m: self.model.apply({"params": p}, t, i, None, m, **extra)[0])
        images = jnp.asarray(self.pixels.transpose(0, 2, 3, 1)[:, None])
        return np.asarray(fn(self.params, jnp.asarray(self.tokens), images, jnp.asarray(self.mask)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    build = lambda path, seed, name: Checkpoint(build_blip2(path, seed=seed + 1, **VARIANTS[name]), name)  # noqa: E731
    return built_once(tmp_path_factory, "blip2", build)


def valid(logits, mask):
    return logits[mask.astype(bool)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(name, checkpoint):
    ck = checkpoint(name)
    assert isinstance(ck.config.llm, OptConfig) == (VARIANTS[name]["text"] == "opt")
    assert ck.config.instruct == ck.instruct
    ours = ck.our_logits()
    assert ours.shape == ck.ref_logits.shape
    assert np.std(ck.ref_logits) > 0.1  # the comparison means something
    np.testing.assert_allclose(valid(ours, ck.mask), valid(ck.ref_logits, ck.mask), atol=1e-4, rtol=0)


def test_eva_hidden_states_match_transformers(checkpoint):
    ck = checkpoint("opt_f2")
    with torch.no_grad():
        ref = ck.torch_model.vision_model(torch.tensor(ck.pixels), output_hidden_states=True)
    tower = EvaTower(ck.config.vision)
    hidden, last = jax.jit(lambda p, x: tower.apply({"params": p}, x))(
        ck.params["vision"], jnp.asarray(ck.pixels.transpose(0, 2, 3, 1))
    )
    assert len(hidden) == len(ref.hidden_states) == ck.config.vision.num_layers + 1
    for ours, theirs in zip(hidden, ref.hidden_states, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_is_bit_exact_and_loads_cleanly(name, checkpoint, tmp_path):
    ck = checkpoint(name)
    out = str(tmp_path / "export")
    export_exact(out, ck.module, ck.config, ck.params, ck.tensors, ck.hf_config)
    ignore = {"transformers_version", "_name_or_path"}
    ca = {k: v for k, v in AutoConfig.from_pretrained(ck.path).to_dict().items() if k not in ignore}
    cb = {k: v for k, v in AutoConfig.from_pretrained(out).to_dict().items() if k not in ignore}
    assert ca == cb
    # A config written from ours alone (no base) must load and convert back to the same config.
    assert ck.module.config_from_hf(ck.module.config_to_hf(ck.config)) == ck.config
    model, info = ck.torch_cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    np.testing.assert_allclose(ck.torch_logits(model.eval()), ck.ref_logits, atol=1e-6, rtol=0)


def test_blip2_config_refuses_the_other_family(checkpoint):
    with pytest.raises(ValueError, match="InstructBLIP"):
        hf_blip2.config_to_hf(checkpoint("instruct_llama_f2").config)
    with pytest.raises(ValueError, match="BLIP-2"):
        hf_instructblip.config_to_hf(checkpoint("opt_f2").config)


def test_greedy_generation_matches_transformers(checkpoint):
    # OPT is the decoder new to generate(); LLaMA-family decoding is covered by the LLaVA tests.
    ck = checkpoint("opt_f2")
    eos = ck.hf_config["text_config"]["eos_token_id"]
    # prompts of different lengths: ours are right-padded in one batch, HF runs each alone
    lengths = (NUM_QUERY_TOKENS + 1 + 3, NUM_QUERY_TOKENS + 1 + PROMPT_LEN)
    prompts = [ck.tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    images = jnp.asarray(ck.pixels.transpose(0, 2, 3, 1)[:, None])
    ours = generate(ck.model, ck.params, prompts, images, max_new_tokens=6, eos_ids=[eos], pad_id=3)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            seq = ck.torch_model.generate(
                pixel_values=torch.tensor(ck.pixels[i : i + 1]),
                input_ids=torch.tensor([prompt]),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=3,
            )
        theirs = seq[0, len(prompt) :].tolist()
        assert len(theirs) > 1 and ours[i][0] == theirs, (i, ours[i][0], theirs)
