"""The tasks ``python -m mllm_jax.evaluate`` knows: name -> evaluator.

Every evaluator has ``max_new_tokens`` (its default), ``read(files, image_root, split, limit)`` -> its
examples, ``count(examples)``, ``template(prompt)`` -> the checked prompt template, and ``run(pretrained,
assets, examples, options, keep_predictions)`` -> ``(metrics, prediction lines)``.
"""

from __future__ import annotations

from mllm_jax.evaluation import (
    coco_captions,
    gqa,
    mmbench,
    mme,
    okvqa,
    pope,
    refcoco,
    scienceqa,
    seed,
    synthetic_grounding,
    synthetic_pope,
    synthetic_retrieval,
    synthetic_video,
    synthetic_vqa,
    textvqa,
    vizwiz,
    vqav2,
)
from mllm_jax.evaluation.synthetic_task import SyntheticTask

TASKS = {
    task.name: task
    for task in (
        coco_captions.TASK,
        vqav2.TASK,
        refcoco.TASK,
        SyntheticTask("synthetic_vqa", synthetic_vqa.MAX_NEW_TOKENS, synthetic_vqa.predictions),
        SyntheticTask(
            "synthetic_grounding", synthetic_grounding.MAX_NEW_TOKENS, synthetic_grounding.predictions
        ),
        SyntheticTask("synthetic_video", synthetic_video.MAX_NEW_TOKENS, synthetic_video.predictions),
        SyntheticTask("synthetic_pope", synthetic_pope.MAX_NEW_TOKENS, synthetic_pope.predictions),
        SyntheticTask(
            "synthetic_retrieval", synthetic_retrieval.MAX_NEW_TOKENS, synthetic_retrieval.predictions
        ),
    )
}
# the LLaVA-1.5 suite (and OK-VQA, VizWiz for the Flamingo line), read from their released files
BENCHMARKS = (gqa, textvqa, scienceqa, pope, mme, mmbench, seed, vizwiz, okvqa)
TASKS |= {m.TASK.name: m.TASK for m in BENCHMARKS}
# task -> lines -> (file suffix, text): the file its leaderboard or server takes (``--predictions``)
SUBMISSIONS = {"vqav2": okvqa.submission} | {
    m.TASK.name: m.TASK.submission for m in BENCHMARKS if m.TASK.submission
}
TASK_NAMES = tuple(TASKS)
