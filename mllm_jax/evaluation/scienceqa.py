"""ScienceQA-IMG (``problems.json`` [+ ``pid_splits.json``]) -> multiple-choice letter accuracy on the
questions of the split that have an image, parsed as LLaVA's ``eval_science_qa.py`` parses answers;
overall, per subject, per grade band and with / without a text context.

Files: ``problems.json`` ``{"<pid>": {"question", "choices": [...], "answer": 0, "hint", "image":
"image.png" | null, "subject": "natural science", "grade": "grade5", "split": "test", ...}}`` and
optionally ``pid_splits.json`` ``{"test": ["<pid>", ...], ...}`` (else each problem's ``"split"``);
``--split`` (default ``test``). Images: ``{image_root}/{split}/{pid}/{image}`` (the release's ``images/``).
"""

from __future__ import annotations

import re

import numpy as np

from mllm_jax.evaluation import benchmark

PROMPT = (
    "USER: <image>\n{question}\nAnswer with the option's letter from the given choices directly. ASSISTANT:"
)
OPTIONS = ("A", "B", "C", "D", "E")  # the official script's letters (a list: "in" is membership)


def parse(text: str, num_choices: int) -> int:
    """The chosen option's index as ``eval_science_qa.py`` reads a generated answer, or -1."""
    text = text.replace("\n", ". ")
    if text.strip() in OPTIONS:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    elif "The answer is " in text:
        m = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
        letter = m.group(1) if m else "FAILED"
    else:
        letter = "FAILED"
    return OPTIONS.index(letter) if letter in OPTIONS[:num_choices] else -1


def question_text(p: dict) -> str:
    """The question as LLaVA-1.5's evaluation (lmms-eval's reproduction) asks it: context, question,
    option lines."""
    context = f"Context: {p['hint']}\n" if p.get("hint") else ""
    return f"{context}{p['question']}\n{benchmark.options_text(p['choices'])}"


def _grade(grade: str) -> str:
    number = int(grade.removeprefix("grade")) if grade.removeprefix("grade").isdigit() else 0
    return "grade_1_6" if 1 <= number <= 6 else "grade_7_12" if 7 <= number <= 12 else ""


def load(files, root, split, skipped):
    split = split or "test"
    problems = benchmark.read_json(files[0])
    if not isinstance(problems, dict) or not all(isinstance(p, dict) for p in list(problems.values())[:10]):
        raise benchmark.layout_error(files[0], '{"<pid>": {"question", "choices", "answer", "image", ...}}')
    if len(files) > 1:
        splits = benchmark.read_json(files[1])
        if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
            raise benchmark.layout_error(files[1], f'{{"{split}": ["<pid>", ...]}}')
        pids = [str(pid) for pid in splits[split]]
    else:
        pids = [pid for pid, p in problems.items() if p.get("split") == split]

    def make(pid):
        p = problems.get(pid)
        if not isinstance(p, dict) or p.get("image") is None:
            return None  # the IMG subset: questions with an image
        choices = benchmark.field(p, "choices", list)
        answer = benchmark.field(p, "answer", int)
        if not 2 <= len(choices) <= len(OPTIONS) or not 0 <= answer < len(choices):
            raise ValueError(f"choices / answer out of range in {pid}")
        p = p | {"question": benchmark.field(p, "question"), "choices": [str(c) for c in choices]}
        image = benchmark.image_path(root, f"{split}/{pid}/{benchmark.field(p, 'image')}", skipped)
        if image is None:
            return None
        return {
            "id": pid,
            "image": image,
            "question": question_text(p),
            "letters": list(OPTIONS[: len(choices)]),
            "answer": OPTIONS[answer],
            "subject": str(p.get("subject", "")).replace(" ", "_"),
            "grade": _grade(str(p.get("grade", ""))),
            "has_context": bool(p.get("hint")),
        }

    return benchmark.collect(pids, make, skipped, files[0])


def correct(line) -> bool:
    text = line.get("generated", line["prediction"]).strip()
    index = parse(text, len(line["letters"]))
    return index >= 0 and OPTIONS[index] == line["answer"]


def score(lines) -> dict:
    hits = [correct(x) for x in lines]
    rows = {"accuracy": float(np.mean(hits))}
    groups = {}
    for line, hit in zip(lines, hits, strict=True):
        for key in (line["subject"], line["grade"], "has_context" if line["has_context"] else "no_context"):
            if key:
                groups.setdefault(key, []).append(hit)
    return rows | {f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(groups.items())}


TASK = benchmark.Benchmark("scienceqa", load, (1, 2), PROMPT, 16, score, multiple_choice=True)
