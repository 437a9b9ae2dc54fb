"""Text -> image retrieval with [RET] (evaluation/synthetic_retrieval.py): the scenes are distinct and
named by their captions, a caption is asked without its image up to [RET], and recall@k ranks images
by cosine similarity (an oracle and a shuffled embedding); the whole path on a tiny random model."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from mllm_jax import families
from mllm_jax.data import synthetic
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.data.transforms import ImageSpec
from mllm_jax.errors import UsageError
from mllm_jax.evaluation import synthetic_retrieval
from mllm_jax.evaluation.decoder import Decoder
from mllm_jax.evaluation.tasks import TASKS
from mllm_jax.families.llava import LlavaSettings
from mllm_jax.models.mllm import Llava, LlavaConfig

CONFIG = synthetic.SyntheticConfig(retrieval_captions=True)
N = 12


@pytest.fixture(scope="module")
def decoder():
    family = families.trainable("llava")
    tokenizer = build_tokenizer(synthetic.vocabulary(CONFIG), family.special_tokens)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=32, patch_size=8
    )
    llm = dict(hidden_size=24, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=12)
    settings = LlavaSettings(vision=vision, llm=llm, vision_feature_layers=(-1,), retrieval={"dim": 8})
    config = family.scratch(settings, tokenizer)
    model = family.build(config)
    # random params without compiling the initialisers
    init = lambda: nn.meta.unbox(model.init(jax.random.key(0), *family.example_inputs(config))["params"])  # noqa: E731
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), jax.eval_shape(init))
    spec = family.model_spec(config, tokenizer)
    return Decoder(model, params, tokenizer, ImageSpec(size=32), spec, "tiny", batch_size=8)


def test_scenes_are_distinct_and_captions_name_each_shape_s_cell():
    items = synthetic_retrieval.distinct_scenes(CONFIG, N)
    assert len({it["caption"] for it in items}) == N
    assert all(it["caption"].split()[-2] in ("left", "right") for it in items)
    one = next(it for it in items if len(it["objects"]) == 1)["objects"][0]
    row = "top" if one["cy"] < 16 else "bottom"
    col = "left" if one["cx"] < 16 else "right"
    assert synthetic.located_caption(CONFIG, [one]) == f"a {one['color']} {one['shape']} {row} {col} ."


def test_a_caption_is_asked_without_its_image_up_to_ret(decoder):
    tokens, mask = synthetic_retrieval.caption_tokens(decoder, ["a red circle top left .", "a blue square ."])
    words = decoder.tokenizer.convert_ids_to_tokens(tokens[0][mask[0] > 0].tolist())
    assert words == ["<s>", "USER", ":", "a", "red", "circle", "top", "left", ".", "ASSISTANT", ":", "[RET]"]
    assert mask[1].sum() == mask[0].sum() - 2 and "<image>" not in words


def _with_embeddings(monkeypatch, text, image):
    monkeypatch.setattr(synthetic_retrieval, "_text", lambda m, p, tokens, mask: text[: len(tokens)])
    monkeypatch.setattr(synthetic_retrieval, "_image", lambda m, p, images: image[: len(images)])
    monkeypatch.setattr(synthetic_retrieval, "_batched", lambda fn, rows, *arrays: fn(*arrays))


def test_recall_ranks_images_by_cosine(decoder, monkeypatch):
    eye = np.eye(N, dtype=np.float32)
    _with_embeddings(monkeypatch, 3.0 * eye, eye)  # caption i is image i: a scale does not matter
    rows = synthetic_retrieval.retrieval_metrics(decoder, CONFIG, N)
    assert rows == {"eval/retrieval_r1": 1.0, "eval/retrieval_r5": 1.0, "eval/retrieval_r1_chance": 1 / N}
    _with_embeddings(monkeypatch, eye, np.roll(eye, 1, axis=0) + 0.1 * eye)  # the right image is 2nd
    rows, lines = synthetic_retrieval.predictions(decoder, CONFIG, N)
    assert rows["eval/retrieval_r1"] == 0.0 and rows["eval/retrieval_r5"] == 1.0
    assert [line["rank"] for line in lines] == [2] * N and lines[0]["prediction"] == lines[1]["caption"]


def test_a_tiny_model_end_to_end_and_a_model_without_the_head(decoder):
    assert "synthetic_retrieval" in TASKS
    rows = synthetic_retrieval.retrieval_metrics(decoder, CONFIG, N)
    # the same ranking from the model's two embeddings, the 12 rows as two batches of 8 (one compilation)
    items = synthetic_retrieval.distinct_scenes(CONFIG, N)
    tokens, mask = synthetic_retrieval.caption_tokens(decoder, [it["caption"] for it in items])
    pixels = np.stack([decoder.image_spec(it["image"]) for it in items])[:, None]
    m, p = decoder.model, decoder.params
    text = np.concatenate(
        [synthetic_retrieval._text(m, p, tokens[s], mask[s]) for s in (slice(8), slice(4, 12))]
    )
    image = np.concatenate([synthetic_retrieval._image(m, p, pixels[s]) for s in (slice(8), slice(4, 12))])
    text, image = np.delete(text, range(8, 12), 0), np.delete(image, range(8, 12), 0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = unit(text) @ unit(image).T
    rank = (cosine > np.diag(cosine)[:, None]).sum(1)  # images scored above the right one
    np.testing.assert_allclose(rows["eval/retrieval_r1"], np.mean(rank < 1))
    np.testing.assert_allclose(rows["eval/retrieval_r5"], np.mean(rank < 5))
    plain = Llava(LlavaConfig())
    with pytest.raises(UsageError, match=r"\[RET\] retrieval head"):
        synthetic_retrieval.retrieval_metrics(decoder.replace(model=plain), CONFIG, N)
