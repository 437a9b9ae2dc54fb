"""What a run is made of, wired from its config: tokenizer, model, initial weights, HF assets, data
iterators, evaluation and FLOP accounting. ``train.Trainer`` drives it.

Where the model comes from (first that applies):
1. the workdir already holds a run: its model config and tokenizer (resume);
2. ``model.init.checkpoint``: one of our checkpoints;
3. ``model.init.hf``: a whole HF directory of the family (``LlavaForConditionalGeneration``,
   ``IdeficsForVisionText2Text``, ``Blip2ForConditionalGeneration``);
4. ``model.init.vision`` + ``model.init.llm``: HF CLIP/SigLIP + LLaMA-family dirs, adapter from scratch
   (how LLaVA stage 1 and Flamingo start);
5. nothing: from scratch with the sizes in ``model.*`` and the built-in tokenizer.

What differs between families (config, module, image layout, processor, FLOPs) is in
``mllm_jax.families.RECIPES``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mllm_jax import errors, hf, sharding
from mllm_jax.data import boxes, pipeline, synthetic, templates, transforms
from mllm_jax.data.tokenizer import build_tokenizer
from mllm_jax.errors import ConfigError
from mllm_jax.families import DTYPES, RECIPES
from mllm_jax.inference import generate
from mllm_jax.models import flops, layers, scan
from mllm_jax.models.layers import check_remat
from mllm_jax.training import checkpoint, optim, train
from mllm_jax.training.runconfig import RunConfig, Stage


class RunSetup:
    def __init__(self, run: RunConfig, workdir: str, n_devices: int | None = None):
        from transformers import AutoTokenizer

        self.run, self.workdir = run, workdir
        self.assets = checkpoint.assets_dir(workdir)
        self.synthetic = (
            synthetic.SyntheticConfig(**run.synthetic) if run.synthetic else synthetic.SyntheticConfig()
        )
        self.skipped: collections.Counter = collections.Counter()
        self._pretrained = None  # numpy params to start from, if any
        self._hf_bases: dict = {}  # HF configs of pretrained vision / llm parts (export bases)
        m, init = run.model, run.model.get("init", {})
        # BLIP-2 stage 1: captions for the Q-Former in its own tokenizer (BERT's), else the LLM's
        self.text_tokenizer = (
            AutoTokenizer.from_pretrained(m["qformer_tokenizer"], trust_remote_code=False)
            if m.get("qformer_tokenizer")
            else None
        )
        family = m.get("family", "llava")
        if family not in RECIPES:
            raise ConfigError(f"config.model.family {family!r}: one of {sorted(RECIPES)} trains here")
        self.recipe = RECIPES[family]
        # Resume only from a run that saved something; a run that died before its first checkpoint
        # starts again from its configured initial weights.
        if checkpoint.is_checkpoint(workdir) and checkpoint.latest_step(workdir) is not None:
            family, self.config = checkpoint.read_model_config(workdir)
            self.tokenizer = AutoTokenizer.from_pretrained(self.assets, trust_remote_code=False)
            fresh = False
        else:
            self.config, self.tokenizer = self._initial_model(m, init)
            fresh = True
        try:
            self.config.validate()
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        try:
            remat = check_remat(m.get("remat", "none"))
        except ValueError as e:
            raise ConfigError(f"config.model.remat: {e}") from None
        try:  # the kernel every step of this run is traced with (process-wide, as bench's --attention)
            layers.use_attention(run.attention)
        except ValueError as e:
            raise ConfigError(f"config.attention: {e}") from None
        self.model = self.recipe.build(
            self.config, DTYPES[run.dtype], remat, bool(m.get("scan_layers", False))
        )
        self.fresh = fresh
        self.image_spec = self._image_spec(m) if fresh else _image_spec_of(_processor_config(self.assets))
        self.model_spec = self.recipe.model_spec(self.config, self.tokenizer)
        _check_location_tokens(run, self.tokenizer)
        self.peak = flops.peak_flops_per_device() * (n_devices or jax.device_count())
        for stage in run.stages:
            self._check_text_input(stage)

    # -- model and weights

    def _initial_model(self, m: dict, init: dict):
        from transformers import AutoTokenizer

        tok_dir = m.get("tokenizer") or ""
        family = self.recipe.name
        if init.get("checkpoint"):
            self._pretrained = checkpoint.load_model(init["checkpoint"])
            if self._pretrained.family != family:
                raise ConfigError(
                    f"config.model.init.checkpoint holds a {self._pretrained.family!r} model, not {family}"
                )
            tok_dir = tok_dir if tok_dir not in ("", "builtin") else checkpoint.assets_dir(init["checkpoint"])
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
            return self._pretrained.config, _location_tokens(m, tokenizer, "config.model.init.checkpoint")
        if init.get("hf"):
            self._pretrained = _load_hf(init["hf"], family, "config.model.init.hf")
            tok_dir = tok_dir if tok_dir not in ("", "builtin") else init["hf"]
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
            return self._pretrained.config, _location_tokens(m, tokenizer, "config.model.init.hf")
        if init.get("vision") or init.get("llm"):
            if not (init.get("vision") and init.get("llm")):
                raise ConfigError("config.model.init.vision and config.model.init.llm must be given together")
            if self.recipe.from_parts is None:
                raise ConfigError(
                    f"config.model.init.vision/llm: {family} starts from a whole model (config.model.init.hf)"
                    " or from scratch"
                )
            vision = _load_hf(init["vision"], self.recipe.vision_family, "config.model.init.vision")
            llm = _load_hf(init["llm"], "llm", "config.model.init.llm")
            tokenizer = AutoTokenizer.from_pretrained(
                tok_dir if tok_dir not in ("", "builtin") else init["llm"], trust_remote_code=False
            )
            missing = [t for t in self.recipe.special_tokens if t not in tokenizer.get_vocab()]
            if missing:
                tokenizer.add_special_tokens({"additional_special_tokens": missing})
            tokenizer = _location_tokens(m, tokenizer)  # grown into the tables below, like <image>
            llm_config, llm_params = llm.config, llm.params
            if self.recipe.grows_vocab and len(tokenizer) > llm_config.vocab_size:
                # e.g. Vicuna's 32000 + <image>: grow the tables, as LLaVA's HF conversion, to a
                # multiple of 64 (IDEFICS keeps new tokens in its separate additional table instead)
                vocab = -(-len(tokenizer) // 64) * 64
                llm_params = grow_vocab(llm_params, vocab)
                llm_config = dataclasses.replace(llm_config, vocab_size=vocab)
            config = self.recipe.from_parts(m, vision.config, llm_config, tokenizer)
            self._pretrained = {"vision": vision.params, "llm": llm_params}
            self._hf_bases = {"vision": vision.hf_config, "llm": llm.hf_config}
            return config, tokenizer
        if tok_dir in ("", "builtin"):
            tokenizer = build_tokenizer(synthetic.vocabulary(self.synthetic), self.recipe.special_tokens)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
        tokenizer = _location_tokens(m, tokenizer)
        try:
            return self.recipe.scratch(m, tokenizer), tokenizer
        except (TypeError, KeyError) as e:
            raise ConfigError(f"config.model: {e}") from None

    def init_fn(self, rng):
        c = self.config
        tokens = jnp.zeros((1, 8), jnp.int32)
        # one media item: a whole clip when the model merges frames (IDEFICS's frame embeddings are made here)
        n = getattr(c, "frames_per_media", 1)
        images = jnp.zeros((1, n, c.vision.image_size, c.vision.image_size, c.vision.num_channels))
        return self.model.init(rng, tokens, images)["params"]

    def initial_params(self, shardings):
        dtype = DTYPES[self.run.param_dtype]
        init = jax.jit(
            lambda k: jax.tree.map(lambda x: x.astype(dtype), nn.meta.unbox(self.init_fn(k))),
            out_shardings=shardings,
        )
        params = init(jax.random.key(self.run.seed))
        loaded = self._pretrained
        if loaded is None:
            return params
        loaded = loaded.params if hasattr(loaded, "params") else loaded
        if self.model.scan_layers:
            loaded = scan.stack_layers(loaded)
        flat, flat_shardings = optim.flatten(params), optim.flatten(shardings)
        for path, value in optim.flatten(loaded).items():
            if path not in flat or tuple(flat[path].shape) != tuple(np.shape(value)):
                raise ConfigError(f"pretrained weight {path} {np.shape(value)} does not fit the model")
            flat[path] = jax.device_put(np.asarray(value).astype(dtype), flat_shardings[path])
        self._pretrained = None  # free host memory
        return optim.unflatten(flat)

    def _image_spec(self, m: dict) -> transforms.ImageSpec:
        init = m.get("init", {})
        source = _assets_source(init)
        if source:
            return _image_spec_of(_processor_config(source))
        if init.get("vision"):
            spec = transforms.ImageSpec.from_processor_config(_processor_config(init["vision"]))
            # the family's processor (saved with the run) decides crop or resize; the tower its stats
            return dataclasses.replace(spec, mode=self.recipe.image_mode, shortest_edge=None)
        size = self.config.vision.image_size
        return transforms.ImageSpec(
            size=size, mean=tuple(m["image_mean"]), std=tuple(m["image_std"]), mode=self.recipe.image_mode
        )

    def write_run_files(self):
        """Model config and HF assets into a new workdir (only once everything has been checked)."""
        if self.fresh and jax.process_index() == 0:  # one writer on multi-host runs (shared storage)
            checkpoint.write_model_config(self.workdir, self.recipe.name, self.config)
            self._write_assets(self.run.model)
            self.fresh = False

    def _write_assets(self, m: dict):
        """Tokenizer, the family's HF processor and the base HF config, so every checkpoint exports
        complete."""
        os.makedirs(self.assets, exist_ok=True)
        init = m.get("init", {})
        source = _assets_source(init)
        if source:
            hf.copy_assets(source, self.assets)
            base = (
                hf.common.read_config(source) if os.path.exists(os.path.join(source, "config.json")) else {}
            )
        else:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

            size = self.config.vision.image_size
            if init.get("vision"):  # the pretrained tower's own preprocessing
                from transformers import AutoImageProcessor

                image_processor = AutoImageProcessor.from_pretrained(init["vision"], trust_remote_code=False)
            else:
                image_processor = CLIPImageProcessorPil(
                    size={"shortest_edge": size},
                    crop_size={"height": size, "width": size},
                    image_mean=list(m.get("image_mean", (0.5, 0.5, 0.5))),
                    image_std=list(m.get("image_std", (0.5,) * 3)),
                )
            # the Q-Former's own tokenizer (BLIP-2 family) travels in the processor
            extra = {"qformer_tokenizer": self.text_tokenizer} if self.text_tokenizer is not None else {}
            self.recipe.processor(self.config, self.tokenizer, image_processor, **extra).save_pretrained(
                self.assets
            )
            t = self.tokenizer
            ids = {
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
                "pad_token_id": t.pad_token_id,
            }
            # the pretrained parts' own HF configs keep the fields we do not model (names, token ids)
            text = {**self._hf_bases.get("llm", {}), **ids}
            base = {"vision_config": dict(self._hf_bases.get("vision", {}))}
            if self.recipe.nested_text_config:
                base["text_config"] = text
            else:  # IDEFICS keeps the decoder's fields at the top level
                base.update(ids)
            with open(os.path.join(self.assets, "generation_config.json"), "w") as f:
                json.dump(ids, f, indent=2)
        if getattr(self.config, "frames_per_media", 1) > 1:
            return  # clips merged into one media item: no HF config to write (convert --to_hf refuses it)
        with open(os.path.join(self.assets, "config.json"), "w") as f:
            json.dump(hf.config_to_hf(self.recipe.name, self.config, base), f, indent=2, sort_keys=True)

    # -- data

    def data_iterator(self, stage: Stage, seed: int):
        return pipeline.make_iterator(
            stage.data,
            self.tokenizer,
            self.image_spec,
            self.model_spec,
            stage.batch_size,
            seed,
            jax.process_index(),
            jax.process_count(),
            skipped=self.skipped,
            synthetic_config=self.synthetic,
            text_tokenizer=self.text_tokenizer,
        )

    def data_counters(self) -> dict:
        if not self.skipped:
            return {}
        return {
            "data/skipped": sum(self.skipped.values()),
            **{f"data/skipped/{k}": v for k, v in self.skipped.items()},
        }

    # -- evaluation

    def evaluate(self, params, stage: Stage) -> dict:
        """End-of-stage (and periodic) evaluation on the built-in held-out data: image-text retrieval
        after a Q-Former stage, VQA (and few-shot VQA, ``eval.shots``) after a generative one, and
        grounding / referring with location tokens (``eval.num_grounding``)."""
        ev = self.run.eval
        if ev.get("stages") and stage.name not in ev["stages"]:
            return {}
        if stage.loss == "qformer":
            if not ev.get("num_retrieval", 0):
                return {}
            from mllm_jax.evaluation import retrieval

            return retrieval.synthetic_retrieval(
                self.model,
                params,
                self.tokenizer,
                self.image_spec,
                self.synthetic,
                num_images=ev["num_retrieval"],
                text_length=stage.data.text_length,
            )
        from mllm_jax.evaluation import grounding, vqa

        template = ev.get("template") or stage.data.template
        if template not in templates.TEMPLATES and template != "chat":
            return {}
        rows = {}
        if ev.get("num_grounding"):  # boxes as location tokens (config.model.location_tokens)
            rows = grounding.synthetic_grounding(
                self.model,
                params,
                self.tokenizer,
                self.image_spec,
                self.model_spec,
                template,
                self.synthetic,
                num_questions=ev["num_grounding"],
                batch_size=ev.get("batch_size", 128),
                mesh=generate.mesh_of(params),
                rules=sharding.rules(self.run.sharding_rules),
            )
        if ev.get("num_clips"):  # motion questions on held-out synthetic clips (data/video.py)
            from mllm_jax.evaluation import video

            rows = rows | video.synthetic_motion(
                self.model,
                params,
                self.tokenizer,
                self.image_spec,
                self.model_spec,
                template,
                self.synthetic,
                num_clips=ev["num_clips"],
                batch_size=ev.get("batch_size", 128),
                max_new_tokens=ev.get("max_new_tokens", 3),
                mesh=generate.mesh_of(params),
                rules=sharding.rules(self.run.sharding_rules),
            )
        if not ev.get("num_questions"):
            return rows
        return rows | vqa.synthetic_vqa(
            self.model,
            params,
            self.tokenizer,
            self.image_spec,
            self.model_spec,
            template,
            self.synthetic,
            num_questions=ev["num_questions"],
            batch_size=ev.get("batch_size", 128),
            max_new_tokens=ev.get("max_new_tokens", 3),
            headline_types=tuple(ev.get("types", vqa.HEADLINE_TYPES)),
            shots=tuple(ev.get("shots", ())),
            # decode on the trainer's mesh, which the params are laid out on
            mesh=generate.mesh_of(params),
            rules=sharding.rules(self.run.sharding_rules),
        )

    def _check_text_input(self, stage: Stage):
        """A generative stage feeds text_tokens to the Q-Former exactly when it reads an instruction."""
        if stage.loss != "lm":
            return
        qformer = getattr(self.config, "qformer", None)
        reads = bool(qformer is not None and qformer.text_input)
        key = f"config.stages.{stage.name}.data.text_length"
        if stage.data.text_length > 0 and not reads:
            raise ConfigError(
                f"{key}={stage.data.text_length}: only an instruction-aware Q-Former "
                "(InstructBLIP, model.qformer.text_input) reads text in a generative stage"
            )
        if reads and stage.data.text_length == 0:
            raise ConfigError(
                f"{key}=0: InstructBLIP's Q-Former reads the instruction; set text_length "
                "> 0 and data.text_source='prompt'"
            )

    def loss_fn(self, stage: Stage):
        """The stage's ``loss_fn(model, params, batch, rng)`` (see ``train.make_train_step``)."""
        if stage.loss == "qformer":
            from mllm_jax.models import blip2_stage1

            if self.recipe.name != "blip2":
                raise ConfigError(f"config.stages.{stage.name}.loss 'qformer' needs model.family 'blip2'")
            return blip2_stage1.stage1_loss
        return train.lm_loss

    def mfu(self, steps_per_sec: float, stage: Stage) -> dict:
        """Model FLOP utilisation of the padded batch against the devices' peak."""
        if not self.peak:
            return {}
        d = stage.data
        per_sequence = self.recipe.flops_per_sequence(self.config, d.max_length, d.max_images)
        return {"mfu": steps_per_sec * stage.batch_size * per_sequence / self.peak}


def grow_vocab(llm_params: dict, vocab: int) -> dict:
    """New token rows (and lm_head columns) start at the mean of the existing ones, as LLaVA does."""
    params = dict(llm_params)
    table = np.asarray(params["embed_tokens"]["embedding"])
    extra = vocab - table.shape[0]
    rows = np.repeat(table.mean(0, keepdims=True), extra, axis=0).astype(table.dtype)
    params["embed_tokens"] = {"embedding": np.concatenate([table, rows])}
    if "lm_head" in params:
        head = np.asarray(params["lm_head"]["kernel"])
        cols = np.repeat(head.mean(1, keepdims=True), extra, axis=1).astype(head.dtype)
        params["lm_head"] = {"kernel": np.concatenate([head, cols], axis=1)}
    return params


def _location_tokens(m: dict, tokenizer, whole_model: str = ""):
    """``config.model.location_tokens``: PaliGemma's ``<loc0000>``..``<loc1023>`` join the tokenizer
    before the model is sized (so the embeddings and LM head cover them, and the saved tokenizer carries
    them). A whole pretrained model (``whole_model``: its config key) is not resized: it must have them."""
    on = m.get("location_tokens", False)
    if not isinstance(on, bool):
        raise ConfigError(f"config.model.location_tokens must be True or False, got {on!r}")
    if not on:
        return tokenizer
    if not whole_model:
        boxes.add_location_tokens(tokenizer)
    elif not set(boxes.LOCATION_TOKENS) <= set(tokenizer.get_vocab()):
        raise ConfigError(
            f"config.model.location_tokens: the tokenizer of {whole_model} lacks <loc0000>..<loc1023> and a"
            " whole pretrained model is not resized; start from init.vision + init.llm or from scratch"
        )
    return tokenizer


def _check_location_tokens(run: RunConfig, tokenizer) -> None:
    """Boxes in the data or the evaluation need the location tokens (else they would read as <unk>)."""
    if boxes.LOCATION_TOKENS[0] in tokenizer.get_vocab():
        return
    users = ["config.eval.num_grounding"] if run.eval.get("num_grounding") else []
    for stage in run.stages:
        for i, (_, d) in enumerate(stage.data.components()):
            if d.source == "synthetic" and d.task in ("grounding", "referring"):
                users.append(
                    f"config.stages.{stage.name}.data." + (f"mix[{i}]." if stage.data.mix else "") + "task"
                )
    if users:
        raise ConfigError(f"{users[0]} needs location tokens: set config.model.location_tokens=True")


def _assets_source(init: dict) -> str:
    """The HF-assets directory of a whole-model init (HF dir or our checkpoint), or ""."""
    if init.get("hf"):
        return init["hf"]
    return checkpoint.assets_dir(init["checkpoint"]) if init.get("checkpoint") else ""


def _load_hf(path: str, family: str, key: str):
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r}: no such directory")
    try:
        pretrained = hf.load_pretrained(path)
    except errors.ConversionError as e:
        raise ConfigError(f"{key}: {e}") from None
    if pretrained.family != family:
        raise ConfigError(f"{key}={path!r} holds a {pretrained.family!r} model; expected {family!r}")
    logging.info("loaded %s weights from %s", family, path)
    return pretrained


def image_spec_of_assets(assets: str) -> transforms.ImageSpec:
    """How the processor saved in ``assets`` prepares images."""
    return _image_spec_of(_processor_config(assets))


def _image_spec_of(d: dict) -> transforms.ImageSpec:
    """The ImageSpec of a saved processor config; IdeficsImageProcessor (``image_size``: a plain
    bicubic resize to a square) is read here, the CLIP/SigLIP/BLIP kinds by ImageSpec itself."""
    d = d.get("image_processor", d)
    if "image_size" in d and "size" not in d:
        return transforms.ImageSpec(
            size=int(d["image_size"]), mean=tuple(d["image_mean"]), std=tuple(d["image_std"]), mode="resize"
        )
    return transforms.ImageSpec.from_processor_config(d)


def _processor_config(assets: str) -> dict:
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = os.path.join(assets, name)
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            if "image_processor" in d:
                return d["image_processor"]
            if "image_mean" in d:
                return d
    raise ConfigError(
        f"{assets}: no image processor config (processor_config.json / preprocessor_config.json)"
    )
