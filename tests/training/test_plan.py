"""``python -m mllm_jax.plan``: the AOT memory plan of the real train step for a TPU slice (libtpu as
a compiler on this CPU) and for simulated CPU devices, its searches, and its one-line errors. The
commands run as background jobs (tests/jobs.py)."""

import ast
import importlib.util
import json
import math
import os

import jobs
import pytest

from mllm_jax import errors, plan
from mllm_jax.models import params as param_tree
from mllm_jax.training import aot, presets, runconfig

GIB = 1024**3
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="TPU targets need libtpu (the test extra installs it)"
)


def run_plan(*args, timeout=600, fresh=False):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return jobs.python("-m", "mllm_jax.plan", *args, env=env, timeout=timeout, fresh=fresh)


def plan_json(*args, fresh=False) -> dict:
    r = jobs.check(run_plan(*args, fresh=fresh))
    return json.loads(r.stdout)


def check_memory(p: dict):
    """Per-chip numbers a user reads: positive, consistent, and at least the chip's share of the state."""
    m = p["memory"]
    assert all(m[k] > 0 for k in ("arguments", "outputs", "peak")) and m["temporaries"] >= 0
    assert m["arguments"] >= p["state_bytes_per_chip"]  # the state is an argument of the step
    assert m["aliased"] >= p["state_bytes_per_chip"]  # and donated: updated in place, counted once
    # f32 params + Adam's two moments of every (trainable) param, split over the chips at best
    assert p["state_bytes_per_chip"] >= 4 * (p["params"] + 2 * p["trainable_params"]) / p["devices"]
    assert p["fits"] == (m["peak"] <= p["memory_limit_bytes"])
    assert "state_changes_after_one_step" not in p  # the Trainer relies on a state that keeps its layout
    tokens = p["global_batch"] * p["seq_len"]
    assert 6 * p["trainable_params"] * tokens / 2 < p["model_flops_per_step"] < 6 * p["params"] * tokens * 2


# ---------------------------------------------------------------- the command


@jobs.fixture
def tiny_v5e_plan(tmp):
    return plan_json(
        "--config=configs/llava.py:tiny",
        "--target=v5e-8",
        "--suggest=false",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
    )


@needs_libtpu
def test_tiny_on_a_v5e_slice_fsdp(tiny_v5e_plan):
    p = tiny_v5e_plan
    assert (p["target"], p["device_kind"], p["devices"], p["hosts"]) == ("v5e-8", "TPU v5 lite", 8, 1)
    assert p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert (p["per_chip_batch"], p["global_batch"], p["seq_len"], p["stage"]) == (4, 32, 36, "instruct")
    check_memory(p)
    # FSDP really splits the state: well under the whole of it on each chip
    assert p["state_bytes_per_chip"] < 4 * 3 * p["params"] / 4
    assert p["memory"]["generated_code"] > 0  # a TPU program, not a CPU one
    assert p["memory_limit_bytes"] == 16 * GIB and p["fits"] is True
    assert p["peak_flops_per_chip"] == 197e12
    assert p["ideal_step_seconds"] == pytest.approx(p["model_flops_per_step"] / (8 * 197e12))
    assert len(p["trials"]) == 1 and "suggest" not in p


@jobs.fixture
def tiny_cpu8_plan(tmp):
    # in its own interpreter (tests/zygote.py)
    return plan_json("--config=configs/llava.py:tiny", "--target=cpu-8", "--max_batch=8", fresh=True)


def test_tiny_on_8_cpu_devices_with_suggestions(tiny_cpu8_plan):
    p = tiny_cpu8_plan
    assert (p["device_kind"], p["devices"], p["mesh"]) == ("cpu", 8, {"data": 8, "fsdp": 1, "tensor": 1})
    check_memory(p)
    assert p["remat"] == "none" and p["per_chip_batch"] == 4 and p["fits"]
    # the configured policy is the least recompute there is and fits; the batch search stops at the cap
    assert p["suggest"]["remat"] == "none" and p["suggest"]["per_chip_batch"] == 8
    trials = {(t["remat"], t["per_chip_batch"]): t for t in p["trials"]}
    assert set(trials) == {("none", 4), ("none", 8)}  # two compilations, each one checked
    assert trials["none", 8]["peak"] <= p["memory_limit_bytes"]
    assert trials["none", 8]["temporaries"] > trials["none", 4]["temporaries"]


@jobs.fixture
def lora_plan(tmp):
    return plan_json(
        "--config=configs/llava.py:tiny,lora", "--target=cpu-2", "--stage=instruct", "--suggest=false"
    )


def test_a_lora_stage_is_planned_with_its_factors(lora_plan):
    """``:tiny,lora`` on cpu-2: the plan counts the rank-16 factors of the LLM's 7 projections in 2 layers
    as trainable (with Adam moments), next to the projector (the only trainable param otherwise)."""
    p = lora_plan
    check_memory(p)
    # A [in, 16] + B [16, out] of q, k, v (2 kv heads of 32), o, gate, up, down
    shapes = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)]
    per_layer = sum(16 * (i + o) for i, o in shapes)
    projector = 64 * 128 + 128 + 128 * 128 + 128
    assert p["trainable_params"] == projector + 2 * per_layer


def test_the_planned_state_is_the_trainers(tmp_path):
    """The Planner's abstract state of a LoRA stage is the Trainer's state (tree, shapes, dtypes,
    shardings) without allocating it, and the step it compiles is the Trainer's own jitted step."""
    import jax
    import sharded_step

    from mllm_jax.training import lora, runconfig

    c = sharded_step.llava("tiny,lora")
    c.stages.instruct.batch_size = 2
    run = runconfig.from_config_dict(c)
    planner = aot.Planner(run, jax.devices()[:1], str(tmp_path), "none", "instruct")
    assert planner.stage.lora.rank == 16
    state, tx, _ = planner.abstract_state()
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    factors = param_tree.flatten(state["trainable"][lora.KEY])
    kernels = {k: v.shape for k, v in param_tree.flatten(state["frozen"]).items()}
    assert {p.rsplit("/", 1)[0] for p in factors} == set(lora.target_paths(kernels, planner.stage.lora))
    mu = param_tree.flatten(state["opt_state"][1][0].mu)
    assert {p for p in mu if p.startswith(lora.KEY + "/")} == {f"{lora.KEY}/{p}" for p in factors}

    trainer = planner.trainer
    concrete, _, _ = trainer.stage_state(planner.stage, trainer._initial_params(None)[0])
    assert jax.tree.structure(state) == jax.tree.structure(concrete)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(concrete), strict=True):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
    assert aot.memory_of(planner.compile("none", 1))["peak"] > aot.state_bytes(state)
    assert planner.drift == []


IMPOSSIBLE = [
    (["--target=v5e-7"], "error: --target 'v5e-7': not a v5e slice; known sizes: v5e-1, v5e-4, v5e-8"),
    (["--target=cpu-8", "--config.mesh.data=3"], "error: config.mesh on cpu-8: mesh"),
    (["--target=cpu-2", "--stage=pretrain"], "error: --stage 'pretrain': the config's stages are"),
    (["--target=cpu-8", "--batch=2", "--remat=most"], "error: --remat 'most': one of"),
    (["--target=cpu-8", "--config.nope=1"], "error: "),
    (["--target=cpu-8", "--config.attention=splash"], "error: config.attention: attention 'splash' is a TPU"),
]


@jobs.fixture
def impossible_plans(tmp):
    return [run_plan("--config=configs/llava.py:tiny", *args, timeout=120) for args, _ in IMPOSSIBLE]


@pytest.mark.parametrize("case", range(len(IMPOSSIBLE)), ids=[" ".join(a) for a, _ in IMPOSSIBLE])
def test_impossible_requests_exit_2_with_one_line(case, impossible_plans):
    r, message = impossible_plans[case], IMPOSSIBLE[case][1]
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""


SPLASH_HLO = """
import sys, tempfile
from mllm_jax.training import aot, presets, runconfig
target = aot.parse_target("v5e-8")
aot.set_platform_env(target)
c = presets.load("configs/llava.py:tiny")
c.attention, c.mesh.data, c.mesh.fsdp, c.mesh.tensor = sys.argv[1], 2, 2, 2
with tempfile.TemporaryDirectory() as d:
    planner = aot.Planner(runconfig.from_config_dict(c), aot.target_devices(target), d, "none", None)
    print(planner.compile("none", 1).as_text().count("tpu_custom_call"))
"""


@jobs.fixture
def splash_hlo_counts(tmp):
    """attention -> the number of Pallas (Mosaic) custom calls in the compiled step."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    counts = {}
    for attention in ("splash", "xla"):
        r = jobs.check(jobs.python("-c", SPLASH_HLO, attention, env=env))
        counts[attention] = int(r.stdout.split()[-1])
    return counts


@needs_libtpu
def test_splash_attention_compiles_to_mosaic_kernels_for_a_tpu(splash_hlo_counts):
    """The real train step with config.attention=splash, sharded over data, fsdp and tensor, compiles for a
    TPU with the Pallas kernels in its program (none with XLA attention)."""
    counts = splash_hlo_counts
    assert counts["splash"] > 0 and counts["xla"] == 0, counts


@jobs.fixture
def llava_7b_plan(tmp):
    return plan_json("--config=configs/llava.py:7b", "--target=v5e-8", "--suggest=false")


# ~150 s of CPU (libtpu compiling a 7B step), out of CI's default run: docs/scaling.md's 7b rows are
# this command's figures; the tiny TPU plans above run the same code and the real presets' batch
# arithmetic is checked below. Run it with `pytest -m slow` after changing a preset or the memory options.
@pytest.mark.slow
@needs_libtpu
def test_llava_7b_on_v5e_8_compiles_without_allocating_it(llava_7b_plan):
    p = llava_7b_plan
    assert p["params"] == pytest.approx(7.06e9, rel=0.01) and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # the preset's memory options (docs/scaling.md): bf16 params, and bf16 Adam moments for the adapter
    # and the LLM (the vision tower is frozen), over 8 chips
    assert (p["param_dtype"], p["moment_dtype"], p["loss_chunk"]) == ("bfloat16", "bfloat16", 512)
    state = (2 * p["params"] + 4 * p["trainable_params"]) / 8
    assert p["state_bytes_per_chip"] == pytest.approx(state, rel=0.01)
    # the global batch of 128 as 8 micro-batches of 2 sequences of 2048 per chip: it fits
    assert (p["per_chip_batch"], p["grad_accum"], p["seq_len"], p["remat"]) == (2, 8, 2048, "full")
    assert p["fits"], p["memory"]
    assert p["memory"]["peak"] > p["state_bytes_per_chip"] and p["fits"] == (p["memory"]["peak"] <= 16 * GIB)
    assert p["model_flops_per_step"] > 6 * p["trainable_params"] * 128 * 2048


# ---------------------------------------------------------------- the real presets, without compiling

# config, preset, stage, the slice its docstring names, the paper's global batch (sequences), sequences
# per chip (per data x fsdp rank) per micro-batch; what docs/scaling.md's table compiles for each
REAL_PRESETS = [
    ("configs/llava.py", "7b", "align", "v5e-8", 256, 2),  # LLaVA-1.5 stage 1
    ("configs/llava.py", "7b", "instruct", "v5e-8", 128, 2),  # LLaVA-1.5 stage 2
    ("configs/llava.py", "13b", "align", "v4-32", 256, 1),
    ("configs/llava.py", "13b", "instruct", "v4-32", 128, 1),
    ("configs/flamingo.py", "9b", "pretrain", "v5e-8", 1280, 4),  # IDEFICS-9B: 1.31M tokens of 1024
    ("configs/flamingo.py", "80b", "pretrain", "v5p-64", 3584, 4),  # IDEFICS-80B: 3.67M tokens
    ("configs/blip2.py", "opt-2.7b", "qformer", "v5e-16", 1680, 105),  # BLIP-2 stage 1, ViT-g
    ("configs/blip2.py", "opt-2.7b", "generate", "v5e-8", 1920, 30),  # BLIP-2 stage 2, OPT
    ("configs/blip2.py", "vicuna-7b", "generate", "v5e-8", 128, 8),  # InstructBLIP, 7B LLMs
]
IDEFICS_TOKENS = {"9b": 1.31e6, "80b": 3.67e6}  # the model card's effective batch, 3 digits


@pytest.mark.parametrize("path, preset, stage_name, target, paper, per_chip", REAL_PRESETS)
def test_a_real_preset_is_the_papers_batch_on_its_slice(path, preset, stage_name, target, paper, per_chip):
    """Arithmetic only: global batch = per chip x (data x fsdp) x grad_accum = the paper's, on a slice
    that plan knows and that the preset's docstring names; tensor groups stay inside one host."""
    run = runconfig.from_config_dict(presets.load(f"{path}:{preset}"))
    stage = {s.name: s for s in run.stages}[stage_name]
    t = aot.parse_target(target)
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert f":{preset}``" in doc and target in doc
    mesh = run.mesh
    assert mesh.fsdp == -1 and t.chips % (mesh.data * mesh.tensor) == 0
    ranks = t.chips // mesh.tensor  # data x fsdp: the batch's shards
    assert mesh.tensor <= (8 if t.generation in ("v5e", "v6e") else 4)
    assert stage.batch_size == paper
    assert stage.batch_size == per_chip * ranks * stage.grad_accum
    if preset in IDEFICS_TOKENS:
        assert round(stage.batch_size * stage.data.max_length, -4) == IDEFICS_TOKENS[preset]


# ---------------------------------------------------------------- targets and searches


@pytest.mark.parametrize(
    "name, chips, generation",
    [
        ("v4-32", 16, "v4"),
        ("v5e-8", 8, "v5e"),
        ("v5e-16", 16, "v5e"),
        ("v5p-8", 4, "v5p"),
        ("v6e-8", 8, "v6e"),
    ],
)
def test_targets_count_chips_as_google_names_slices(name, chips, generation):
    t = aot.parse_target(name)
    assert (t.platform, t.chips, t.generation) == ("tpu", chips, generation)
    assert aot.memory_limit(t) == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}[generation] * GIB


@pytest.mark.parametrize(
    "name, message",
    [
        ("tpu-8", "expected cpu-N or a TPU slice"),
        ("v4-8x", "expected"),
        ("v5p-6", "known sizes: v5p-8, v5p-16"),
    ],
)
def test_unknown_targets_are_named(name, message):
    with pytest.raises(errors.PlanError, match=message):
        aot.parse_target(name)


def test_state_drift_names_the_leaves_a_step_changes():
    import jax
    import jax.numpy as jnp

    sds = jax.ShapeDtypeStruct
    state = {
        "params": {"w": sds((2, 3), jnp.bfloat16)},
        "mu": {"w": sds((2, 3), jnp.bfloat16)},
        "step": sds((), jnp.int32),
    }
    assert aot.state_drift(state, state) == []
    new = {**state, "mu": {"w": sds((2, 3), jnp.float32)}}
    assert aot.state_drift(state, new) == ["['mu']['w']: bfloat16[2, 3] -> float32[2, 3]"]


def test_memory_of_a_compile_that_ran_out_of_hbm():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(46.16G) exceeds available HBM (15.75G)."
    )
    m = aot.memory_of_failure(message, state=GIB)
    assert m["temporaries"] == int(46.16 * GIB) and m["peak"] == GIB + int(46.16 * GIB) and m["lower_bound"]
    assert aot.memory_of_failure("RESOURCE_EXHAUSTED: something else", state=GIB)["peak"] is None


AFFINE = [
    (lambda b: 100 + 7 * b, 1000),  # as XLA's numbers nearly are
    (lambda b: 900 + 30 * b, 1000),  # only a few fit
    (lambda b: 100 + 7 * b + (13 if b % 3 == 0 else 0), 1000),  # with some noise
    (lambda b: 1000 + b, 1000),  # not even one fits
    (lambda b: 10 + b, 1e9),  # everything fits: the cap
]
CURVED = [
    (lambda b: 50 + 3 * b + 0.05 * b * b, 1000),  # convex
    (lambda b: 300 + 40 * math.sqrt(b), 1000),  # concave
    (lambda b: 100 + 7 * (b // 8 + 1) * 8, 1000),  # steps (padding to a tile)
    (lambda b: 100 + 7 * b if b <= 128 else math.inf, 1000),  # compiles that fail with no size
]


@pytest.mark.parametrize("start", [1, 4, 100, 300])
@pytest.mark.parametrize("memory, limit", AFFINE + CURVED)
def test_largest_fitting_batch(memory, limit, start):
    best, proven, seen = plan.largest_fitting(memory, start, limit, cap=256)
    answer = max((b for b in range(1, 257) if memory(b) <= limit), default=None)
    assert len(seen) <= 8
    if (memory, limit) in AFFINE:  # found and proven in at most four compilations
        assert (best, proven) == (answer, True) and len(seen) <= 4
    if proven:
        assert best == answer
        if answer is not None and answer < 256:  # both sides of the answer were measured
            assert seen[answer] <= limit < seen[answer + 1]
    if best is not None:  # whatever is suggested was measured to fit
        assert seen[best] <= limit and best <= answer


def test_least_recompute_policy():
    order = ("none", "save_dots", "minimal", "full")
    for first_fitting in range(len(order) + 1):
        calls = []

        def fits(p, k=first_fitting, calls=calls):
            calls.append(p)
            return order.index(p) >= k

        for first in (None, "full", "none"):
            calls.clear()
            expected = order[first_fitting] if first_fitting < len(order) else None
            assert plan.least_recompute(fits, order, first) == expected
            assert len(calls) <= 3 and (first is None or calls[0] == first)
