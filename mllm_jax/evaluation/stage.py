"""The evaluation training runs after a stage (and every ``eval.every`` steps), on the built-in held-out
synthetic data, chosen by the run's ``config.eval`` keys:

- a Q-Former stage (``loss="qformer"``): image -> text retrieval recall (``num_retrieval`` images);
- a generative stage, in the stage's (or ``eval.template``'s) conversation template: grounding and
  referring (``num_grounding``), motion questions on clips (``num_clips``), POPE's yes / no
  existence questions (``num_pope``), then VQA (``num_questions``,
  with ``types`` as the headline and few-shot ``shots``), each decoded in batches of ``batch_size``
  on the mesh the params are laid out on.

``eval.stages`` limits it to the named stages. Training calls ``evaluate_stage`` with the parts it
holds; nothing here depends on a model family.
"""

from __future__ import annotations

from mllm_jax.data import templates
from mllm_jax.evaluation import (
    retrieval,
    synthetic_grounding,
    synthetic_pope,
    synthetic_video,
    synthetic_vqa,
)
from mllm_jax.evaluation.decoder import Decoder


def evaluate_stage(
    model,
    params,
    tokenizer,
    image_spec,
    model_spec,
    synthetic_config,
    ev,
    stage,
    *,
    mesh=None,
    rules=None,
) -> dict:
    """The ``eval/...`` rows after ``stage`` (a ``runconfig.Stage``: its ``name``, ``loss``,
    ``data.template`` and ``data.text_length`` are read) per ``ev`` (``config.eval``, a
    ``runconfig.EvalConfig``). ``mesh``: decode sharded over it (the trainer's, which the params are
    laid out on); ``rules``: the run's ``sharding.rules(...)``. Empty when nothing applies."""
    if ev.stages and stage.name not in ev.stages:
        return {}
    if stage.loss == "qformer":
        if not ev.num_retrieval:
            return {}
        return retrieval.synthetic_retrieval(
            model,
            params,
            tokenizer,
            image_spec,
            synthetic_config,
            num_images=ev.num_retrieval,
            text_length=stage.data.text_length,
        )
    template = ev.template or stage.data.template
    if template not in templates.TEMPLATES and template != templates.CHAT:
        return {}
    decoder = Decoder(
        model,
        params,
        tokenizer,
        image_spec,
        model_spec,
        template,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        mesh=mesh,
        rules=rules,
    ).placed()
    rows = {}
    if ev.num_grounding:  # boxes as location tokens (config.model.location_tokens)
        boxes = decoder.replace(max_new_tokens=synthetic_grounding.MAX_NEW_TOKENS)
        rows |= synthetic_grounding.grounding_metrics(boxes, synthetic_config, ev.num_grounding)
    if ev.num_clips:  # motion questions on held-out synthetic clips (data/video.py)
        rows |= synthetic_video.motion_metrics(decoder, synthetic_config, ev.num_clips)
    if ev.num_pope:  # yes / no object-existence questions (hallucination)
        rows |= synthetic_pope.pope_rows(decoder, synthetic_config, ev.num_pope)
    if ev.num_questions:
        rows |= synthetic_vqa.vqa_metrics(decoder, synthetic_config, ev.num_questions, ev.types, ev.shots)
    return rows
