"""Tasks on the built-in held-out synthetic data, as ``python -m mllm_jax.evaluate`` runs them on our
checkpoints: ``--data`` is an optional JSON file of ``SyntheticConfig`` fields (e.g. the run's
``config.synthetic``), ``--prompt`` a conversation template name (default ``tiny``) and ``--limit`` the
number of questions or clips (default 256). Metric keys are the ones training logs."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from mllm_jax.data import synthetic, templates
from mllm_jax.errors import UsageError
from mllm_jax.evaluation import family_hooks
from mllm_jax.evaluation.options import Options

DEFAULT_TEMPLATE = "tiny"  # as training's eval
DEFAULT_COUNT = 256


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
    config: synthetic.SyntheticConfig
    num_questions: int


def read_config(path: str) -> synthetic.SyntheticConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path!r}: no such file")
    try:
        with open(path) as f:
            fields = json.load(f)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return synthetic.SyntheticConfig(**fields)
    except (ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"--data {path!r}: not a SyntheticConfig JSON object ({e})") from None


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """A task on the held-out synthetic data; ``predict(decoder, synthetic config, n)`` -> ``(metrics,
    prediction lines)`` is its evaluator's (``synthetic_vqa``, ``synthetic_grounding``, ...)."""

    name: str
    max_new_tokens: int
    predict: Callable

    def read(self, files: list[str], image_root: str | None, split: str | None, limit: int | None):
        if image_root is not None or split is not None:
            raise UsageError(f"--image_root and --split do not apply to {self.name}")
        if len(files) > 1:
            raise UsageError(f"--data: {self.name} takes at most one JSON file of SyntheticConfig fields")
        config = read_config(files[0]) if files else synthetic.SyntheticConfig()
        return SyntheticSet(config, limit or DEFAULT_COUNT)

    def count(self, examples: SyntheticSet) -> int:
        return examples.num_questions

    def template(self, prompt: str | None) -> str:
        template = prompt or DEFAULT_TEMPLATE
        if template not in templates.TEMPLATES and template != templates.CHAT:
            known = ", ".join([*templates.TEMPLATES, templates.CHAT])
            raise UsageError(f"--prompt {template!r}: {self.name} takes a template name: {known}")
        return template

    def run(self, pretrained, assets: str, examples: SyntheticSet, options: Options, keep_predictions=True):
        """``(metrics, prediction lines)`` of a loaded model (no lines unless ``keep_predictions``)."""
        decoder = family_hooks.synthetic_decoder(
            pretrained,
            assets,
            self.name,
            template=self.template(options.prompt),
            batch_size=options.batch_size,
            max_new_tokens=options.max_new_tokens or self.max_new_tokens,
            mesh=options.mesh,
        )
        rows, lines = self.predict(decoder, examples.config, examples.num_questions)
        return rows, lines if keep_predictions else []
