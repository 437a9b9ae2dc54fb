"""Packed sequences (data/packing.py): the same examples packed and unpacked give the same per-example
losses and the same gradients (LLaVA, IDEFICS, BLIP-2 stage 2), the packed stream resumes exactly,
splash reads the segments off the mask, and the stages that cannot pack are refused in one line."""

from __future__ import annotations

import importlib.util
import os

import chex
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import bench
from mllm_jax.data import packing
from mllm_jax.data.config import DataConfig
from mllm_jax.data.pipeline import make_iterator
from mllm_jax.data.synthetic import SyntheticConfig, vocabulary
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.errors import ConfigError
from mllm_jax.models import layers, llm
from mllm_jax.training import inputs, pack_bench, runconfig, step, wiring

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_LLM = dict(num_layers=1, hidden_size=32, intermediate_size=64)


def _config(name: str, preset: str = "tiny"):
    spec = importlib.util.spec_from_file_location(
        f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _run(name: str, stage: str, max_length: int, **model):
    c = _config(name)
    for key, value in (SMALL_LLM | model).items():
        setattr(c.model.llm if key in SMALL_LLM else c.model, key, value)
    for part in ("vision", "qformer", "perceiver"):  # one layer of everything keeps compiling cheap
        if part in c.model and "num_layers" in c.model[part]:
            c.model[part].num_layers = 1
    c.stages[stage].data.mix = ()
    c.stages[stage].data.task = "vqa"
    c.stages[stage].data.max_length = max_length
    c.stages[stage].data.max_images = 1
    return runconfig.from_config_dict(c)


def _examples(setup, data: DataConfig, n: int) -> list[dict]:
    batch = next(make_iterator(data, setup.tokenizer, setup.image_spec, setup.model_spec, n, seed=3))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _pack(examples: list[dict], length: int, slots: int, pad_id: int, spec) -> list[dict]:
    source = grain.MapDataset.source(examples).to_iter_dataset()
    rows = packing.PackIterDataset(source, length, slots, pad_id, spec)
    return list(rows)


def _stack(rows: list[dict], n: int, slots: int, length: int, pad_id: int) -> dict:
    """``n`` rows of ``slots`` images, each row as the models read it (all-padding rows added)."""
    out = {}
    for key in ("tokens", "targets", "loss_mask", "segment_ids", "positions"):
        fill = pad_id if key in ("tokens", "targets") else 0
        filled = [r[key] for r in rows] + [np.full(length, fill, rows[0][key].dtype)] * (n - len(rows))
        out[key] = np.stack(filled)
    images = np.zeros((n, slots, *rows[0]["images"].shape[1:]), np.float32)
    for i, r in enumerate(rows):
        images[i, : len(r["images"])] = r["images"]
    out["images"] = images
    return out


def _unpacked(examples: list[dict]) -> list[dict]:
    return [
        e | {"segment_ids": e["attention_mask"], "positions": np.arange(len(e["tokens"]), dtype=np.int32)}
        for e in examples
    ]


@pytest.mark.parametrize(
    "name,stage,length,model",
    [
        ("llava", "instruct", 64, {}),
        ("flamingo", "instruct", 48, dict(cross_layer_interval=1)),
        ("blip2", "generate", 64, dict(num_query_tokens=8)),
    ],
)
def test_packed_and_unpacked_examples_have_the_same_losses_and_gradients(
    tmp_path, name, stage, length, model
):
    run = _run(name, stage, length, **model)
    setup = wiring.RunSetup(run, str(tmp_path), 1)
    data = run.stages[[s.name for s in run.stages].index(stage)].data
    n = 6
    examples = _examples(setup, data, n)
    pad_id = int(examples[0]["tokens"][-1])
    spec = setup.model_spec
    slots = packing.row_images(length, 1, 3, spec)
    rows = _pack(examples, length, slots, pad_id, spec)
    assert len(rows) < n and max(r["segment_ids"].max() for r in rows) >= 2  # examples do share rows
    packed = _stack(rows, n, slots, length, pad_id)
    unpacked = _stack(_unpacked(examples), n, slots, length, pad_id)
    chex.assert_trees_all_equal(packed["loss_mask"].sum(), unpacked["loss_mask"].sum())

    # random values of the params' shapes: cheaper than compiling the model's init, and every gate open
    shapes = nn.meta.unbox(jax.eval_shape(setup.init_fn, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)

    @jax.jit
    def nll_and_grads(params, b):
        def loss(p):
            logits, _ = setup.model.apply(
                {"params": p}, b["tokens"], b["images"], b["positions"], b["segment_ids"]
            )
            logp = jax.nn.log_softmax(logits, axis=-1)
            nll_BxT = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0] * b["loss_mask"]
            return nll_BxT.sum(), nll_BxT

        (_, nll_BxT), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return nll_BxT, grads

    count = unpacked["loss_mask"].sum()
    nll_u, grads_u = nll_and_grads(params, unpacked)  # one compilation: both batches have one shape
    nll_p, grads_p = nll_and_grads(params, packed)
    nll_u, nll_p = np.asarray(nll_u), np.asarray(nll_p)
    # example k: row i of the unpacked batch; in the packed rows, the k-th segment in reading order
    seg = packed["segment_ids"]
    per_example_p = [nll_p[r][seg[r] == s].sum() for r in range(n) for s in range(1, seg[r].max() + 1)]
    targets = unpacked["loss_mask"].sum(1)
    np.testing.assert_allclose(np.asarray(per_example_p) / targets, nll_u.sum(1) / targets, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(
        jax.tree.map(lambda g: g / count, grads_p),
        jax.tree.map(lambda g: g / count, grads_u),
        atol=1e-5,
        rtol=0,
    )
    # the images matter (else the check above would hold for a model that ignored them)
    assert float(jnp.abs(jnp.asarray(jax.tree.leaves(grads_u["vision"])[0])).max()) > 0


def test_rows_keep_each_example_and_restart_positions():
    spec = packing.ModelSpec(image_token_id=9, tokens_per_image=2)
    ex = (
        lambda toks: {  # noqa: E731
            "tokens": np.asarray(toks + [0] * (8 - len(toks)), np.int32),
            "targets": np.asarray(toks[1:] + [0] * (9 - len(toks)), np.int32),
            "loss_mask": np.asarray([1.0] * (len(toks) - 1) + [0.0] * (9 - len(toks)), np.float32),
            "attention_mask": np.asarray([1] * len(toks) + [0] * (8 - len(toks)), np.int32),
            "images": np.full((1, 2, 2, 3), len(toks), np.float32),
        }
    )
    a, b, c = ex([1, 9, 9, 5]), ex([1, 6]), ex([1, 9, 9, 7, 7])
    rows = _pack([a, b, c], 8, 2, 0, spec)
    assert len(rows) == 2  # a and b share a row; c (5 tokens) does not fit after them
    r = rows[0]
    np.testing.assert_array_equal(r["tokens"], [1, 9, 9, 5, 1, 6, 0, 0])
    np.testing.assert_array_equal(r["targets"], [9, 9, 5, 0, 6, 0, 0, 0])  # a's last target is padding
    np.testing.assert_array_equal(r["loss_mask"], [1, 1, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(r["positions"], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(r["images"][:, 0, 0, 0], [4, 0])  # b has no image: slot 2 stays empty
    np.testing.assert_array_equal(rows[1]["positions"], np.arange(8))  # one example: as unpacked
    # image slots close a row too: two one-image examples in a row of one slot
    assert len(_pack([a, a], 8, 1, 0, spec)) == 2


def test_packed_stream_resumes_exactly_and_pads_less():
    tok = build_tokenizer(vocabulary(SyntheticConfig()))
    spec = packing.ModelSpec(image_token_id=tok.convert_tokens_to_ids("<image>"), tokens_per_image=4)
    image = ImageSpec(16, mode="resize")
    data = DataConfig(max_length=48, size=64, packing=True, packed_images=4)
    it = make_iterator(data, tok, image, spec, batch_size=4, seed=0)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = make_iterator(data, tok, image, spec, batch_size=4, seed=0)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    plain = next(make_iterator(DataConfig(max_length=48, size=64), tok, image, spec, batch_size=4, seed=0))
    assert expected[0]["images"].shape[1] == 4 and expected[0]["segment_ids"].max() >= 2
    assert 1 - expected[0]["attention_mask"].mean() < 0.5 * (1 - plain["attention_mask"].mean())


def test_padding_fraction_metric():
    mask = jnp.asarray([[1, 1, 1, 0], [2, 2, 1, 0]])
    assert float(step._padding({"attention_mask": mask})["data/padding_fraction"]) == pytest.approx(0.25)


def test_splash_reads_segments_off_a_packed_causal_mask():
    """What splash computes from the segment ids (causal, within the window, same segment) is the mask
    on every real query (padding queries' rows are never read)."""
    idx = jnp.arange(8)
    for seg in (
        jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]),
        jnp.asarray([[1, 0, 1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]]),  # 0/1 masks with holes
    ):
        for window in (None, 1, 2, 3):
            mask = llm.chunk_mask(2, 8, seg, sliding_window=window)[:, 0]
            labels = layers.segments_of(mask)
            rebuilt = (idx[None, :] <= idx[:, None]) & (labels[:, :, None] == labels[:, None, :])
            rebuilt &= (labels > 0)[:, None, :]
            if window is not None:
                rebuilt &= (idx[:, None] - idx[None, :]) < window
            real = (seg > 0)[:, :, None]
            np.testing.assert_array_equal(rebuilt & real, mask & real)
    mask = llm.chunk_mask(2, 8, jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0]] * 2))[0, 0]
    assert not mask[2, 1] and mask[4, 2] and not mask[5, 4] and mask[6, 5]  # padding queries: valid keys


def test_stages_that_cannot_pack_are_refused(tmp_path):
    c = _config("blip2")
    c.stages.qformer.data.packing = True
    with pytest.raises(ConfigError, match=r"config.stages.qformer.data.packing=True: loss 'qformer'"):
        inputs.check_packing(runconfig.from_config_dict(c))
    c = _config("llama_adapter")
    stage = c.stage_order[0]
    c.stages[stage].data.packing = True
    with pytest.raises(ConfigError, match="model.family 'llama_adapter' cannot pack"):
        inputs.check_packing(runconfig.from_config_dict(c))
    c = _config("llava", "tiny_retrieval")  # the [RET] head pairs a row's [RET] with its first image
    for stage in c.stage_order:
        c.stages[stage].data.packing = True
    with pytest.raises(ConfigError, match=r"model.family 'llava' cannot pack: config.model.retrieval"):
        inputs.check_packing(runconfig.from_config_dict(c))
    with pytest.raises(ValueError, match=r"data.mix\[0\].packing: set it on the parent"):
        DataConfig(mix=({"weight": 1.0, "packing": True},))


def test_bench_packs_the_same_examples_with_less_padding():
    config = bench.bench_config("tiny")
    examples = pack_bench.draw_examples(pack_bench.LengthModel(), 400, 256, config)
    spec = packing.ModelSpec(config.image_token_id, config.tokens_per_image)
    unpacked = pack_bench.unpacked_batches(examples, 4, 2)
    packed = pack_bench.packed_batches(examples, 4, 2, 256, spec)
    lengths = [packing.example_length(e) for e in examples]
    assert min(lengths) < 40 and max(lengths) > 150  # ragged
    used = sum(int(b["segment_ids"].max(1).sum()) for b in packed)  # the first `used` examples, packed
    assert sum(float(b["loss_mask"].sum()) for b in packed) == sum(
        e["loss_mask"].sum() for e in examples[:used]
    )
    pad = lambda bs: 1 - np.mean([(b["attention_mask"] > 0).mean() for b in bs])  # noqa: E731
    assert pad(packed) < 0.2 < 0.5 < pad(unpacked)
