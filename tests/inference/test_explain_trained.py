"""On a tiny LLaVA trained on the built-in shapes (`configs/llava.py:tiny`, minutes on a CPU: slow), the
attention map's peak falls on the asked-about shape for at least 80% of held-out single-shape images.
docs/serving.md gives the measured rate (``python -c "import sys; sys.path[:0] = ['tests',
'tests/inference']; import test_explain_trained as t; print(t.localization('WORKDIR'))"``)."""

import subprocess
import sys

import numpy as np
import pytest
from commands import ROOT
from PIL import Image

from mllm_jax import families
from mllm_jax.data import synthetic
from mllm_jax.families import store
from mllm_jax.inference import explain, generate
from mllm_jax.inference.inputs import eos_token_ids, prepare_inputs


def single_shape_examples(n: int):
    """Held-out examples of the training's synthetic config with one shape, and a question about it."""
    config = synthetic.SyntheticConfig()
    out, i = [], 0
    while len(out) < n:
        ex = synthetic.make_example(config, "heldout", i)
        i += 1
        if len(ex["objects"]) == 1:
            out.append((ex["image"], ex["objects"][0]))
    return out


def localization(workdir: str, n: int = 40) -> dict:
    """The share of ``n`` held-out single-shape images whose heatmap peak (a patch) overlaps the shape."""
    pre, assets = store.load_any(workdir)
    hits, answers = 0, []
    for image, obj in single_shape_examples(n):
        prompt = f"USER : <image> {synthetic.COLOR_QUESTION.format(shape=obj['shape'])} ASSISTANT :"
        inputs = prepare_inputs(pre.family, pre.config, assets, prompt, [Image.fromarray(image)])
        model = families.build(pre.family, inputs.config or pre.config)
        [(ids, _)] = generate.generate(
            model, pre.params, [inputs.tokens], inputs.pixels, max_new_tokens=2,
            eos_ids=eos_token_ids(assets, pre.hf_config, inputs.tokenizer),
        )  # fmt: skip
        answers.append(inputs.tokenizer.decode(ids, skip_special_tokens=True).strip() == obj["color"])
        [map_GxG] = explain.explain(model, pre.params, inputs.tokens, ids, inputs.pixels).maps_IxGxG
        g = map_GxG.shape[0]
        row, col = np.unravel_index(np.argmax(map_GxG), map_GxG.shape)
        patch = image.shape[0] / g
        x0, y0, x1, y1 = obj["box"]
        hits += bool(
            col * patch < x1 and (col + 1) * patch > x0 and row * patch < y1 and (row + 1) * patch > y0
        )
    return {"images": n, "peak_on_shape": hits / n, "answer_accuracy": float(np.mean(answers))}


@pytest.mark.slow
def test_heatmap_peak_falls_on_the_asked_shape(tmp_path):
    workdir = str(tmp_path / "llava_tiny")
    subprocess.run(
        [sys.executable, "-m", "mllm_jax.main", "--config=configs/llava.py:tiny", f"--workdir={workdir}"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    result = localization(workdir)
    assert result["peak_on_shape"] >= 0.8, result
