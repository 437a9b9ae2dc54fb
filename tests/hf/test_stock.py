"""Stock checkpoints as users download them (issue 19): a ``CLIPModel`` directory (text and vision halves)
and a ``SiglipModel`` one as ``config.model.init.vision``, ``.bin``-only directories converted once by
``convert --from_hf=DIR --to_safetensors=OUT``, and the original LLaVA repo's checkpoints converted by
``convert --from_llava_repo``; docs/tpu.md's walkthrough run on tiny stand-ins of them, with its own
commands and flags (only the sizes changed)."""

import json
import os
import re
import shlex
import subprocess

import jobs
import numpy as np
import pytest
import torch
from PIL import Image
from test_tpu_scripts import env_without_xla_flags, job_argv

from mllm_jax.errors import ConfigError, ConversionError
from mllm_jax.families import store
from mllm_jax.hf import common
from mllm_jax.training import inputs, model_init, presets, runconfig

ROOT = jobs.ROOT
DOC = os.path.join(ROOT, "docs", "tpu.md")
BUCKET = "gs://MY_BUCKET"
CLIP, VICUNA = "clip-vit-large-patch14-336", "vicuna-7b-v1.5"  # the stock repos' names, as the doc has them

BUILD = """
import sys
sys.path[:0] = ["tests", "tests/hf"]
import hf_fixtures as F
import stock_fixtures as S
root = sys.argv[1]
F.build_dual(f"{root}/ws/clip-vit-large-patch14-336", "clip", seed=1, as_bin=True)
F.build_llama_bin(f"{root}/ws/vicuna-7b-v1.5", seed=2, shards=2)
S.build_siglip_stock(f"{root}/siglip", seed=3)
F.build_llava_repo(f"{root}/llava-repo", f"{root}/ws/clip-vit-large-patch14-336", seed=4, tower_inside=True)
F.build_llava_repo(f"{root}/llava-pretrain", f"{root}/ws/clip-vit-large-patch14-336", seed=5, stage1=True)
"""
# step 6's command on tiny sizes: stage 1 of a few steps, batches (the micro-batch is one sequence, as on
# the v5e-16), warm-up and sequence length; logging every step; one CPU process instead of a slice
TINY = [
    "--config.stage_order=('align',)",  # stage 1 only: the suite's budget (both stages' data are checked)
    "--config.stages.align.steps=2",
    "--config.stages.align.batch_size=16",
    "--config.stages.align.warmup_steps=1",
    "--config.stages.align.data.max_length=48",
    "--config.stages.instruct.steps=2",
    "--config.stages.instruct.batch_size=8",
    "--config.stages.instruct.warmup_steps=1",
    "--config.stages.instruct.data.max_length=96",
    "--config.log_every=1",
    "--config.tensorboard=False",
    "--distributed=off",  # one process here; the slice's hosts are what --distributed=on joins
    "--config.attention=xla",  # a real preset may pick the TPU kernel (splash), which a CPU cannot run
]


def doc_lines() -> list[str]:
    """The lines of docs/tpu.md's bash blocks, continuation lines joined."""
    text = open(DOC).read()
    blocks = [b.split("```")[0].replace("\\\n", " ") for b in text.split("```bash\n")[1:]]
    return [line.strip() for b in blocks for line in b.splitlines()]


def slice_variables() -> dict[str, str]:
    """``SLICE`` -> its line of variables (``NAME=... SLICE=... B=... ALIGN_ACCUM=...``)."""
    out = {}
    for line in doc_lines():
        m = re.fullmatch(r"(?:[A-Z_]+=[\w:/.-]+ *)+", line)
        if m and "SLICE=" in line:
            out[re.search(r"SLICE=(\S+)", line).group(1)] = line
    return out


def launched_flags(slice_name: str) -> list[str]:
    """The flags step 6's launch gives ``mllm_jax.main`` on ``slice_name`` (tpu/launch.sh --dry-run)."""
    [launch] = [line for line in doc_lines() if line.startswith("tpu/launch.sh ")]
    dry = launch.replace("tpu/launch.sh", f"{ROOT}/tpu/launch.sh --dry-run", 1)
    script = f"{slice_variables()[slice_name]}\n{dry}"
    env = env_without_xla_flags()
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    argv = job_argv(shlex.split(r.stdout)[-1].split("=", 1)[1])
    assert argv[1:4] == ["../mllm_jax_env/bin/python", "-m", "mllm_jax.main"], argv
    return argv[4:]


def write_llava_json(data, name: str, conversations, n: int = 16):
    """LLaVA-format records whose images sit under ``data/images``."""
    rng = np.random.default_rng(len(name))
    os.makedirs(data / "images" / "part", exist_ok=True)
    records = []
    for i in range(n):
        image = f"part/{name}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(data / "images" / image)
        records.append({"id": f"{name}{i}", "image": image, "conversations": conversations(i)})
    (data / name).write_text(json.dumps(records))


@jobs.fixture
def stock_dirs(tmp):
    """Tiny stand-ins in the stock layouts: ``ws/`` is a workstation after ``hf download`` of the two
    stock repos (a CLIPModel and a LLaMA, both ``.bin`` only), plus a SiglipModel dir and two
    checkpoints of the original LLaVA repo (a whole one with the tower inside, a stage-1 projector). The
    SiglipModel dir keeps its tokenizer as google/siglip-* do (``spiece.model``, no tokenizer.json)."""
    jobs.check(jobs.python("-c", BUILD, str(tmp)))
    return tmp


@jobs.fixture
def walkthrough(tmp):
    """docs/tpu.md run here with ``B`` a local folder: step 2's conversions and data, step 6's launch
    command for the v5e-16 on tiny sizes (stage 1), the same command again (resume), step 9's export.
    Returns the folder and what the commands printed."""
    src = jobs.result("stock_dirs")
    ws = tmp / "ws"
    os.symlink(src / "ws", ws)  # the downloaded stock repos; the bucket is the same folder here
    out = {}
    for line in doc_lines():
        if line.startswith("python -m mllm_jax.convert --from_hf="):
            jobs.check(jobs.python(*shlex.split(line)[1:], cwd=str(ws)))
    data = ws / "data"
    caption = lambda i: [  # noqa: E731
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": ["a red circle", "a blue square", "two green stars"][i % 3]},
    ]
    chat = lambda i: [  # noqa: E731
        {"from": "human", "value": "<image>\nwhat color is the circle ?"},
        {"from": "gpt", "value": ["red", "blue", "green"][i % 3]},
        {"from": "human", "value": "how many shapes are there ?"},
        {"from": "gpt", "value": "two"},
    ]
    write_llava_json(data, "blip_laion_cc_sbu_558k.json", caption)
    write_llava_json(data, "llava_v1_5_mix665k.json", chat)
    flags = [f.replace(BUCKET, str(ws)) for f in launched_flags("v5e-16")]
    main = ["-m", "mllm_jax.main", *flags, *TINY]
    out["first"] = jobs.check(jobs.python(*main))
    out["again"] = jobs.check(jobs.python(*main))
    [export] = [line for line in doc_lines() if line.startswith("python -m mllm_jax.convert --from=$B")]
    export = shlex.split(export.split("#")[0].replace("$B", str(ws)))
    jobs.check(jobs.python(*export[1:], cwd=str(ws)))
    out["flags"] = flags
    return ws, out


@jobs.fixture
def llava_repo_converted(tmp):
    """``convert --from_llava_repo`` of both LLaVA-repo checkpoints (the tower and the stage-1 LLM from
    the walkthrough's converted stock directories)."""
    src = jobs.result("stock_dirs")
    ws, _ = jobs.result("walkthrough")
    convert = ("-m", "mllm_jax.convert", f"--vision={ws / 'models' / CLIP}")
    jobs.check(jobs.python(*convert, f"--from_llava_repo={src / 'llava-repo'}", f"--to_hf={tmp / 'whole'}"))
    llm = f"--llm={ws / 'models' / VICUNA}"
    jobs.check(
        jobs.python(*convert, f"--from_llava_repo={src / 'llava-pretrain'}", llm, f"--to_hf={tmp / 'pre'}")
    )
    mixed = ("--from_hf=" + str(src / "siglip"), f"--to={tmp / 'c'}", f"--to_safetensors={tmp / 's'}")
    return src, ws, tmp, jobs.check(jobs.python("-m", "mllm_jax.convert", *mixed), 2)


# The two other stock layouts, each as the init of step 6's command (the v5e-16's flags, the walkthrough's
# tiny sizes): a SiglipModel dir as init.vision (its patches all kept: SigLIP has no class token), and
# the LLaVA repo's whole checkpoint converted by --from_llava_repo as init.hf (as from_pytorch_llava.md
# says). The latter is the walkthrough's model again (same tower and LLM sizes): its programs come from
# the compilation cache.
OTHER_INITS = {
    "siglip": lambda src, ws, conv: [
        f"--config.model.init.vision={src / 'siglip'}",
        f"--config.model.init.llm={ws / 'models' / VICUNA}",
        "--config.model.vision_feature_select_strategy=full",
    ],
    "llava_repo": lambda src, ws, conv: [f"--config.model.init.hf={conv / 'whole'}"],
}


@jobs.fixture
def other_stock_runs(tmp):
    """Stage 1 of step 6's command from each of ``OTHER_INITS`` (its ``model.init`` flags replaced), then
    step 9's export; returns ``layout -> (workdir, export dir)``."""
    src = jobs.result("stock_dirs")
    ws, out = jobs.result("walkthrough")
    runs = {}
    for layout, init in OTHER_INITS.items():
        conv = jobs.result("llava_repo_converted")[2] if layout == "llava_repo" else None
        workdir, export = tmp / layout, tmp / f"{layout}-hf"
        flags = [f for f in out["flags"] if not f.startswith(("--config.model.init.", "--workdir="))]
        main = ["-m", "mllm_jax.main", *flags, f"--workdir={workdir}", *init(src, ws, conv), *TINY]
        jobs.check(jobs.python(*main))
        jobs.check(jobs.python("-m", "mllm_jax.convert", f"--from={workdir}", f"--to_hf={export}"))
        runs[layout] = workdir, export
    return runs


def bin_tensors(directory) -> dict:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".bin"):
            out.update(torch.load(os.path.join(directory, name), weights_only=True))
    return out


def test_bin_only_dirs_convert_exactly_and_are_refused_otherwise(stock_dirs, walkthrough):
    """docs/tpu.md step 2: each tensor of the ``.bin`` files (sharded with an index, or one file) in a
    safetensors directory, same names, dtypes and values; config, tokenizer and preprocessor copied.
    Everything else refuses the ``.bin`` directory in one line that names the command."""
    ws, _ = walkthrough
    for name, files in ((VICUNA, 2), (CLIP, 1)):
        src, out = stock_dirs / "ws" / name, ws / "models" / name
        theirs, ours = bin_tensors(src), common.read_safetensors(str(out))
        assert (
            sorted(theirs) == sorted(ours)
            and len([n for n in os.listdir(out) if n.endswith(".safetensors")]) == files
        )
        for k, t in theirs.items():
            assert str(t.dtype).replace("torch.", "") == str(ours[k].dtype) and np.array_equal(
                t.numpy(), ours[k]
            ), k
        for asset in os.listdir(src):
            if not asset.endswith((".bin", ".bin.index.json")):
                assert (out / asset).read_bytes() == (src / asset).read_bytes(), asset
        with pytest.raises(ConversionError, match=f"--from_hf={src} --to_safetensors=OUT_DIR"):
            store.load_pretrained(str(src))


def test_the_walkthrough_trains_from_stock_dirs_resumes_and_exports(stock_dirs, walkthrough):
    """Step 6's command (the v5e-16's flags: the converted stock CLIPModel + LLaMA dirs, both stages'
    LLaVA-JSON data, grad_accum 16 / 8, no synthetic evaluation) trains stage 1 on tiny sizes; rerun
    unchanged, it resumes and trains no more steps; step 9's export loads in transformers with no
    missing or unexpected keys, its tower the CLIPModel's vision half, its vocabulary grown by <image>."""
    from transformers import AutoModel, LlavaForConditionalGeneration

    ws, out = walkthrough
    flags = dict(f.split("=", 1) for f in out["flags"])
    assert flags["--config.model.init.vision"] == f"{ws}/models/{CLIP}"  # the converted CLIPModel dir
    assert flags["--config.model.init.llm"] == f"{ws}/models/{VICUNA}"
    for stage, name in (("align", "blip_laion_cc_sbu_558k.json"), ("instruct", "llava_v1_5_mix665k.json")):
        assert flags[f"--config.stages.{stage}.data.path"] == f"{ws}/data/{name}"
        assert flags[f"--config.stages.{stage}.data.image_root"] == f"{ws}/data/images"
    assert flags["--config.stages.align.grad_accum"] == "16" and flags["--config.eval.num_questions"] == "0"
    rows = [json.loads(line) for line in (ws / "llava-7b" / "metrics.jsonl").read_text().splitlines()]
    trained = [(r["stage"], r["step"]) for r in rows if "loss" in r]
    assert trained == [("align", 1), ("align", 2)], rows
    assert not any(k.startswith("eval") for r in rows for k in r), rows
    assert "resuming from step 2" in out["again"].stderr
    model, info = LlavaForConditionalGeneration.from_pretrained(
        str(ws / "llava-7b-hf"), output_loading_info=True
    )
    assert not any(info.values()), info
    clip = AutoModel.from_pretrained(str(stock_dirs / "ws" / CLIP)).vision_model.state_dict()
    tower = (
        model.model.vision_tower.vision_model.state_dict()
        if hasattr(model.model.vision_tower, "vision_model")
        else model.model.vision_tower.state_dict()
    )
    for k, v in clip.items():  # frozen, kept in the preset's parameter dtype
        assert torch.equal(tower[k], v.to(tower[k].dtype)), k
    # Vicuna's vocabulary (52 words here) grown by <image> to a multiple of 64, the old rows kept
    vicuna = common.read_safetensors(str(ws / "models" / VICUNA))["model.embed_tokens.weight"]
    table = model.model.language_model.embed_tokens.weight.detach()  # the preset's dtype too (frozen)
    assert table.shape == (64, vicuna.shape[1]) and model.config.image_token_index == vicuna.shape[0]
    assert torch.equal(table[: vicuna.shape[0]], torch.tensor(vicuna).to(table.dtype))


@pytest.mark.parametrize("layout", OTHER_INITS)
def test_the_other_stock_layouts_train_stage1_and_export(stock_dirs, other_stock_runs, layout):
    """With step 6's command (tiny sizes), a stock SiglipModel dir (``init.vision``) and an original
    LLaVA-repo checkpoint converted by ``--from_llava_repo`` (``init.hf``) each train stage 1 (the loss
    logged, a checkpoint written) and export to a HF LLaVA dir that transformers loads with no missing or
    unexpected keys, the frozen tower and LLM still the stock ones."""
    from transformers import LlavaForConditionalGeneration, SiglipModel

    workdir, export = other_stock_runs[layout]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [(r["stage"], r["step"]) for r in rows if "loss" in r]
    assert trained == [("align", 1), ("align", 2)] and all(
        np.isfinite(r["loss"]) for r in rows if "loss" in r
    )
    assert (workdir / "checkpoints" / "2").is_dir()
    model, info = LlavaForConditionalGeneration.from_pretrained(str(export), output_loading_info=True)
    assert not any(info.values()), info
    vision = model.model.vision_tower
    tower = (vision.vision_model if hasattr(vision, "vision_model") else vision).state_dict()
    llm = model.model.language_model.state_dict()
    if layout == "siglip":
        assert model.config.vision_config.model_type == "siglip_vision_model"
        assert model.config.vision_feature_select_strategy == "full"
        stock_tower = SiglipModel.from_pretrained(str(stock_dirs / "siglip")).vision_model.state_dict()
        stock_llm = bin_tensors(stock_dirs / "ws" / VICUNA)
    else:
        repo = bin_tensors(stock_dirs / "llava-repo")
        inside = "model.vision_tower.vision_tower.vision_model."
        stock_tower = {k[len(inside) :]: v for k, v in repo.items() if k.startswith(inside)}
        stock_llm = repo
    stock_llm = {k[len("model.") :]: v for k, v in stock_llm.items() if k.startswith("model.layers.")}
    assert sorted(stock_tower) == sorted(tower) and sorted(stock_llm) == sorted(
        k for k in llm if k.startswith("layers.")
    )
    for ours, theirs in ((tower, stock_tower), (llm, stock_llm)):  # frozen, in the preset's param dtype
        for k, v in theirs.items():
            assert torch.equal(ours[k], v.to(ours[k].dtype)), k


def test_a_siglip_model_dir_is_read_as_its_vision_half(stock_dirs, tmp_path):
    """``config.model.init.vision`` accepts a stock SiglipModel directory: its tower is exactly the one
    transformers' SiglipVisionModel loads from that directory (whose logits tests/hf/test_towers.py
    checks), and its export base is the vision config."""
    from transformers import SiglipVisionModel
    from transformers.utils import sentencepiece_model_pb2_new as sp

    # the stand-in's files are the stock repo's: a SentencePiece tokenizer over the text half's vocabulary
    siglip = stock_dirs / "siglip"
    assert sorted(os.listdir(siglip)) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
        "spiece.model", "tokenizer_config.json",
    ]  # fmt: skip
    pieces = sp.ModelProto.FromString((siglip / "spiece.model").read_bytes()).pieces
    assert len(pieces) == json.loads((siglip / "config.json").read_text())["text_config"]["vocab_size"]
    pretrained = model_init.load_hf(str(siglip), "vit", "config.model.init.vision")
    assert pretrained.hf_config["model_type"] == "siglip_vision_model" and pretrained.config.pooling_head
    SiglipVisionModel.from_pretrained(str(stock_dirs / "siglip")).save_pretrained(str(tmp_path / "tower"))
    tower = store.load_pretrained(str(tmp_path / "tower"))
    assert tower.config == pretrained.config
    ours, theirs = common.flatten(pretrained.params), common.flatten(tower.params)
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_missing_preprocessor_or_tokenizer_is_one_line_naming_the_file(stock_dirs, tmp_path):
    vision = tmp_path / "siglip"
    os.makedirs(vision)
    for name in os.listdir(stock_dirs / "siglip"):
        if name != "preprocessor_config.json":
            os.symlink(stock_dirs / "siglip" / name, vision / name)
    with pytest.raises(ConfigError, match="no preprocessor_config.json") as e:
        model_init.check_processor(str(vision), "config.model.init.vision")
    assert "\n" not in str(e.value) and "config.model.init.vision=" in str(e.value)
    files = "tokenizer.json / tokenizer_config.json / tokenizer.model / spiece.model / vocab.json"
    with pytest.raises(ConfigError, match=f"no tokenizer files \\({files}\\); point") as e:
        model_init.check_tokenizer(str(tmp_path), "config.model.init.llm")
    assert "\n" not in str(e.value)
    # main's start-up check reads the same list (and takes gs:// paths)
    config = presets.load("configs/llava.py:tiny")
    config.model.tokenizer = str(tmp_path)
    run = runconfig.from_config_dict(config)
    with pytest.raises(ConfigError, match="holds no tokenizer .tokenizer.json, tokenizer_config.json, "):
        inputs.check_inputs(run, str(tmp_path / "workdir"))
    os.symlink(stock_dirs / "siglip" / "spiece.model", tmp_path / "spiece.model")  # SentencePiece alone
    model_init.check_tokenizer(str(tmp_path), "k")
    inputs.check_inputs(run, str(tmp_path / "workdir"))
    model_init.check_processor(str(stock_dirs / "siglip"), "k")
    model_init.check_tokenizer(str(stock_dirs / "siglip"), "k")


def test_llava_repo_checkpoints_convert_to_hf_llava_dirs(llava_repo_converted):
    """The original LLaVA repo's layout (``model.mm_projector.0/2``, the tower saved inside as
    ``model.vision_tower.vision_tower.*``; a stage-1 ``mm_projector.bin`` with the base LLM given by
    --llm) becomes a HF LLaVA directory that transformers loads with no missing keys, each tensor the
    one it came from (the vocabulary grown by <image> and <pad> to a multiple of 64)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src, ws, out, mixed = llava_repo_converted
    assert mixed.stderr.splitlines()[-1].startswith("error: use one of --from_hf=HF_DIR --to=CKPT_DIR")
    assert not os.path.exists(out / "c") and not os.path.exists(out / "s")  # two commands' flags: neither
    vicuna = common.read_safetensors(str(ws / "models" / VICUNA))
    for name, repo in (("whole", "llava-repo"), ("pre", "llava-pretrain")):
        theirs = bin_tensors(src / repo)
        if repo == "llava-pretrain":  # the projector alone: the LLM is --llm's
            assert sorted(theirs) == [
                f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")
            ]
            theirs.update({k: torch.tensor(v) for k, v in vicuna.items()})
        model, info = LlavaForConditionalGeneration.from_pretrained(str(out / name), output_loading_info=True)
        assert not any(info.values()), info
        ours = {k: v for k, v in model.state_dict().items()}
        assert torch.equal(
            ours["model.multi_modal_projector.linear_1.weight"], theirs["model.mm_projector.0.weight"]
        )
        assert torch.equal(
            ours["model.multi_modal_projector.linear_2.bias"], theirs["model.mm_projector.2.bias"]
        )
        assert torch.equal(
            ours["model.language_model.layers.1.mlp.down_proj.weight"],
            theirs["model.layers.1.mlp.down_proj.weight"],
        )
        table, old = ours["model.language_model.embed_tokens.weight"], theirs["model.embed_tokens.weight"]
        assert table.shape[0] == 64 and torch.equal(table[: old.shape[0]], old)
        if repo == "llava-repo":
            inside = theirs["model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]
            assert torch.equal(ours["model.vision_tower.encoder.layers.0.mlp.fc1.weight"], inside)
        config = json.loads((out / name / "config.json").read_text())
        assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
        processor = AutoProcessor.from_pretrained(str(out / name))
        image = Image.fromarray(np.zeros((20, 24, 3), np.uint8))
        inputs = processor(images=image, text="USER: <image> what color ? ASSISTANT:", return_tensors="pt")
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()
        assert store.load_pretrained(str(out / name)).family == "llava"
    with pytest.raises(ConversionError, match="--from_llava_repo="):
        store.load_pretrained(str(src / "llava-repo"))
    with pytest.raises(ConversionError, match="holds the projector only .stage 1.: pass --llm=DIR"):
        store.from_llava_repo(str(src / "llava-pretrain"), str(ws / "models" / CLIP), str(out / "x"))


class NotATensor:  # what a full unpickle would build, and the restricted loader refuses
    pass


def test_the_bin_reader_never_fully_unpickles_and_needs_torch_only_when_used(tmp_path, monkeypatch):
    from mllm_jax.hf import pytorch_bin

    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"w": torch.ones(2), "evil": NotATensor()}, path)
    with pytest.raises(ConversionError, match="not a plain tensor file .PyTorch's weights_only loader") as e:
        pytorch_bin.load(path)
    assert "\n" not in str(e.value)
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16), "n": 3}, path)
    with pytest.raises(ConversionError, match="entry 'n' is a int, not a tensor"):
        pytorch_bin.load(path)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were not installed
    with pytest.raises(
        ConversionError, match="needs PyTorch, which mllm_jax does not install: pip install torch"
    ):
        pytorch_bin.load(path)
