"""What a run is made of, wired from its config: the family, tokenizer, model, initial weights, HF
assets, data iterators, stage losses, evaluation and FLOP accounting. ``train.Trainer`` drives it.

Where the model comes from is ``model_init``'s business; on resume, the workdir's model config and
tokenizer. What differs between families is asked of ``mllm_jax.families``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np

from mllm_jax import families, sharding
from mllm_jax.data import boxes, pipeline
from mllm_jax.errors import ConfigError
from mllm_jax.evaluation.stage import evaluate_stage
from mllm_jax.families import DTYPES, base, store
from mllm_jax.inference import generate
from mllm_jax.models import blip2_stage1, flops, layers, scan
from mllm_jax.models import params as param_tree
from mllm_jax.training import assets, dpo, model_init, step
from mllm_jax.training.runconfig import RunConfig, Stage

# config.stages.*.loss -> loss_fn(model, params, batch, rng) (see ``step.make_train_step``); "dpo" also
# takes the stage's beta
LOSSES = {"lm": step.lm_loss, "qformer": blip2_stage1.stage1_loss, "dpo": dpo.dpo_loss}
# a DPO stage reads pairs (data/preference.py), and only it does: these sources / synthetic tasks
PAIR_DATA = {("preference_json", None), ("synthetic", "preference")}


class RunSetup:
    def __init__(
        self, run: RunConfig, workdir: str, n_devices: int | None = None, platform: str | None = None
    ):
        """``platform``: what the steps compile for, when not this process's backend (``plan``)."""
        from transformers import AutoTokenizer

        self.workdir = workdir
        self.assets = store.assets_dir(workdir)
        self.synthetic = run.synthetic
        self.skipped: collections.Counter = collections.Counter()
        # Resume only from a run that saved something; a run that died before its first checkpoint
        # starts again from its configured initial weights.
        self.fresh = not (store.is_checkpoint(workdir) and store.latest_step(workdir) is not None)
        if self.fresh:  # HF directories in a bucket are read from local copies
            run = dataclasses.replace(run, model=model_init.local_model(run.model))
        self.run = run
        m = run.model
        # BLIP-2 stage 1: captions for the Q-Former in its own tokenizer (BERT's), else the LLM's
        text_tokenizer = m.tokenizers().get("qformer_tokenizer")
        self.text_tokenizer = (
            AutoTokenizer.from_pretrained(text_tokenizer, trust_remote_code=False) if text_tokenizer else None
        )
        self.family = families.trainable(m.family)
        if self.fresh:
            start = model_init.initial_model(self.family, m, self.synthetic)
        else:
            _, config = store.read_model_config(workdir)
            start = model_init.InitialModel(
                config, AutoTokenizer.from_pretrained(store.local_assets(workdir), trust_remote_code=False)
            )
        self.config, self.tokenizer = start.config, start.tokenizer
        self._pretrained, self._hf_bases = start.params, start.hf_bases
        try:
            self.config.validate()
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        try:
            remat = layers.check_remat(m.remat)
        except ValueError as e:
            raise ConfigError(f"config.model.remat: {e}") from None
        try:  # the kernel every step of this run is traced with
            kernel = layers.attention_kernel(run.attention, platform)
        except ValueError as e:
            raise ConfigError(f"config.attention: {e}") from None
        self.model = self.family.build(self.config, DTYPES[run.dtype], remat, m.scan_layers, attention=kernel)
        self.image_spec = (
            model_init.image_spec(self.family, m, self.config)
            if self.fresh
            else base.image_spec_of_assets(store.local_assets(workdir))
        )
        self.model_spec = self.family.model_spec(self.config, self.tokenizer)
        _check_location_tokens(run, self.tokenizer)
        _check_existence_words(run, self.tokenizer)
        self.peak = flops.peak_flops_per_device() * (n_devices or jax.device_count())
        for stage in run.stages:
            self._check_stage(stage)

    # -- model and weights

    def init_fn(self, rng):
        return self.model.init(rng, *self.family.example_inputs(self.config))["params"]

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
        if self.family.scans_layers(self.model):
            loaded = scan.stack_layers(loaded)
        flat, flat_shardings = param_tree.flatten(params), param_tree.flatten(shardings)
        for path, value in param_tree.flatten(loaded).items():
            if path not in flat or tuple(flat[path].shape) != tuple(np.shape(value)):
                raise ConfigError(f"pretrained weight {path} {np.shape(value)} does not fit the model")
            flat[path] = jax.device_put(np.asarray(value).astype(dtype), flat_shardings[path])
        self._pretrained = None  # free host memory
        return param_tree.unflatten(flat)

    def write_run_files(self):
        """Model config and HF assets into a new workdir (only once everything has been checked)."""
        if self.fresh and jax.process_index() == 0:  # one writer on multi-host runs (shared storage)
            store.write_model_config(self.workdir, self.family.name, self.config)
            assets.write_assets(
                self.assets,
                self.family,
                self.run.model,
                self.config,
                self.tokenizer,
                self._hf_bases,
                self.text_tokenizer,
            )
            self.fresh = False

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

    # -- stages

    def evaluate(self, params, stage: Stage) -> dict:
        """End-of-stage (and periodic) evaluation on the built-in held-out data (``evaluation.stage``),
        decoding on the trainer's mesh, which the params are laid out on."""
        return evaluate_stage(
            self.model,
            params,
            self.tokenizer,
            self.image_spec,
            self.model_spec,
            self.synthetic,
            self.run.eval,
            stage,
            mesh=generate.mesh_of(params),
            rules=sharding.rules(self.run.sharding_rules),
        )

    def _check_stage(self, stage: Stage):
        """The family supports the stage's loss, and a generative stage feeds text_tokens to the
        Q-Former exactly when it reads an instruction."""
        _check_pair_data(stage)
        # DPO compares the LM log-likelihoods of two answers: every family with an LM loss supports it
        supported = (*self.family.losses, "dpo") if "lm" in self.family.losses else self.family.losses
        if stage.loss not in supported:
            owners = " or ".join(repr(f.name) for f in families.TRAINABLE.values() if stage.loss in f.losses)
            raise ConfigError(f"config.stages.{stage.name}.loss {stage.loss!r} needs model.family {owners}")
        if stage.loss not in ("lm", "dpo"):
            return
        reads = self.family.text_positions(self.config) > 0
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
        """The stage's ``loss_fn(model, params, batch, rng)`` (see ``step.make_train_step``)."""
        if stage.loss == "dpo":
            return functools.partial(LOSSES["dpo"], beta=stage.beta)
        if stage.loss_chunk:
            if hasattr(self.model, "train_outputs"):  # its own losses need the whole forward pass
                raise ConfigError(
                    "loss_chunk cannot be used with a model that has losses of its own "
                    "(config.model.retrieval): set loss_chunk=0"
                )
            return functools.partial(LOSSES["lm"], chunk=stage.loss_chunk)
        return LOSSES[stage.loss]

    def mfu(self, steps_per_sec: float, stage: Stage) -> dict:
        """Model FLOP utilisation of the padded batch against the devices' peak."""
        if not self.peak:
            return {}
        d = stage.data
        per_sequence = self.family.flops_per_sequence(self.config, d.max_length, d.max_images)
        if stage.loss == "dpo":  # a batch row is a pair, and the reference runs too
            per_sequence *= dpo.SEQUENCES_PER_PAIR
        return {"mfu": steps_per_sec * stage.batch_size * per_sequence / self.peak}


def _check_location_tokens(run: RunConfig, tokenizer) -> None:
    """Boxes in the data or the evaluation need the location tokens (else they would read as <unk>)."""
    if boxes.LOCATION_TOKENS[0] in tokenizer.get_vocab():
        return
    users = ["config.eval.num_grounding"] if run.eval.num_grounding else []
    for stage in run.stages:
        for i, (_, d) in enumerate(stage.data.components()):
            if d.source == "synthetic" and d.task in ("grounding", "referring"):
                users.append(
                    f"config.stages.{stage.name}.data." + (f"mix[{i}]." if stage.data.mix else "") + "task"
                )
    if users:
        raise ConfigError(f"{users[0]} needs location tokens: set config.model.location_tokens=True")


def _check_pair_data(stage: Stage) -> None:
    """A DPO stage reads preference pairs, every other stage single conversations (a batch holds one
    or the other)."""
    for i, (_, d) in enumerate(stage.data.components()):
        pairs = (d.source, d.task if d.source == "synthetic" else None) in PAIR_DATA
        if pairs != (stage.loss == "dpo"):
            key = f"config.stages.{stage.name}.data." + (f"mix[{i}]." if stage.data.mix else "")
            what = f"source {d.source!r}" + (f" task {d.task!r}" if d.source == "synthetic" else "")
            need = "preference pairs: source 'preference_json' or synthetic task 'preference'"
            raise ConfigError(
                f"{key}{'source' if d.source != 'synthetic' else 'task'}: {what} in a stage with loss "
                f"{stage.loss!r}; "
                + (f"loss 'dpo' reads {need}" if stage.loss == "dpo" else f"only loss 'dpo' reads {need}")
            )


def _check_existence_words(run: RunConfig, tokenizer) -> None:
    """POPE and the synthetic existence / preference tasks ask "is there a ... in the image ?" and
    answer yes / no: words the built-in tokenizer has only with synthetic.existence_questions."""
    users = ["config.eval.num_pope"] if run.eval.num_pope else []
    for stage in run.stages:
        for i, (_, d) in enumerate(stage.data.components()):
            if d.source == "synthetic" and d.task in ("existence", "preference"):
                users.append(
                    f"config.stages.{stage.name}.data." + (f"mix[{i}]." if stage.data.mix else "") + "task"
                )
    if not users:
        return
    ids = tokenizer.encode("is there a red circle in the image ? yes no", add_special_tokens=False)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise ConfigError(
            f"{users[0]} asks yes / no existence questions, but the tokenizer lacks some of their words: "
            "set config.synthetic.existence_questions=True (built-in tokenizer)"
        )
