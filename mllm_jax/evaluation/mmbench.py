"""MMBench (the released ``.tsv``, images inline as base64) -> circular accuracy (a question counts only
if every rotation of its options is answered right) overall and per category, and the single-pass
accuracy; answers are matched to options as VLMEvalKit's exact matching (``can_infer``) does, without
its ChatGPT fallback (an answer it cannot match is wrong).

File: ``mmbench_dev_20230712.tsv`` (tab-separated, a header row): ``index``, ``question``, ``hint``,
``A``..``D`` (empty cells: fewer options), ``answer`` (absent in test), ``category``, ``image``
(base64), and others passed through. Rows whose index is >= 1,000,000 are the release's own circular
copies (group = index % 1,000,000): then each row is asked once; otherwise each question is asked once
per rotation of its options (LLaVA's ``--all-rounds``).
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

from mllm_jax.evaluation import benchmark, xlsx

PROMPT = (
    "USER: <image>\n{question}\nAnswer with the option's letter from the given choices directly. ASSISTANT:"
)
COPY = 1_000_000  # the release's circular copies: index + k * COPY
REJECTIONS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
REQUIRED = ("index", "question", "A", "B", "image")


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """The option letter an answer names (``"Z"``: a refusal), as VLMEvalKit's ``can_infer``; None when
    neither a single letter nor a single option's text is found."""
    if any(r in answer for r in REJECTIONS):
        return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    named = [c for c in choices if c in splits]
    if len(named) == 1:
        return named[0]
    if not named and ("Z" in splits) + ("" in splits) == 1:
        return "Z"
    lower = answer.lower()
    by_text = [k for k, v in choices.items() if str(v).lower() in lower]
    return by_text[0] if len(by_text) == 1 else None


def _question(hint: str, question: str, options: list[str]) -> str:
    """LLaVA's ``model_vqa_mmbench.py``: hint, question, option lines."""
    text = f"{hint}\n{question}" if hint else question
    return f"{text}\n{benchmark.options_text(options)}"


def load(files, root, split, skipped):
    path = files[0]
    if not os.path.isfile(path):
        raise benchmark.layout_error(path, "an MMBench .tsv file")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    header = set(rows[0]) if rows else set()
    if not set(REQUIRED) <= header:
        raise benchmark.layout_error(path, f"a tab-separated header with {', '.join(REQUIRED)}")
    letters = [c for c in benchmark.LETTERS if c in header]
    precircular = any(r["index"].isdigit() and int(r["index"]) >= COPY for r in rows)

    def make(r):
        index = int(benchmark.field(r, "index"))
        options = []
        for c in letters:  # options stop at the first empty cell, as LLaVA's get_options
            if not r.get(c) or r[c].lower() == "nan":
                break
            options.append(r[c])
        if len(options) < 2 or not r.get("image"):
            raise ValueError("fewer than 2 options or no image")
        hint = r.get("hint") or ""
        record = {
            "id": index,
            "group": index % COPY,
            "image": f"{os.path.basename(path)}#{index}",
            "image_b64": r["image"],
            "hint": "" if hint.lower() == "nan" else hint,
            "raw_question": r["question"],
            "options": options,
            "category": r.get("category", ""),
            "rotate": not precircular,
        }
        answer = (r.get("answer") or "").strip()
        if answer:
            if answer not in benchmark.LETTERS[: len(options)]:
                raise ValueError(f"answer {answer!r} is not one of the options")
            record["answer_index"] = benchmark.LETTERS.index(answer)
        return record

    return benchmark.collect(rows, make, skipped, path)


def expand(record: dict) -> list[dict]:
    """The items asked: every rotation of the options (round r shows option r first), or the row."""
    n = len(record["options"])
    items = []
    for r in range(n if record["rotate"] else 1):
        options = record["options"][r:] + record["options"][:r]
        item = {k: v for k, v in record.items() if k != "answer_index"}
        item |= {"round": r, "options": options, "letters": list(benchmark.LETTERS[:n])}
        item["question"] = _question(record["hint"], record["raw_question"], options)
        if "answer_index" in record:
            item["answer"] = benchmark.LETTERS[(record["answer_index"] - r) % n]
        items.append(item)
    return items


def chosen(line) -> str | None:
    choices = dict(zip(line["letters"], line["options"], strict=True))
    return can_infer(line["prediction"], choices)


def _category(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def score(lines) -> dict:
    if not all("answer" in x for x in lines):
        return {}
    groups: dict[int, list[bool]] = {}
    category = {}
    for line in lines:
        groups.setdefault(line["group"], []).append(chosen(line) == line["answer"])
        category[line["group"]] = _category(line["category"])
    first = [chosen(x) == x["answer"] for x in lines if x.get("round", 0) == 0 and x["id"] < COPY]
    rows = {"circular_accuracy": float(np.mean([all(v) for v in groups.values()]))}
    rows["accuracy"] = float(np.mean(first)) if first else 0.0
    for name in sorted(set(category.values()) - {""}):
        hits = [all(v) for g, v in groups.items() if category[g] == name]
        rows[f"circular_accuracy/{name}"] = float(np.mean(hits))
    return rows


def submission(lines):
    """The sheet the MMBench server takes (LLaVA's ``convert_mmbench_for_submission.py``): the release's
    columns less the image and metadata, with ``prediction`` (the generated text; with rotations, the
    first round's) after the options; one row per row of the release."""
    letters = list(benchmark.LETTERS[: max(len(x["options"]) for x in lines)])
    rows = [["index", "question", *letters, "prediction", "answer"]]
    for x in lines:
        if x.get("round", 0) == 0:
            options = x["options"] + [""] * (len(letters) - len(x["options"]))
            rows.append([x["id"], x["raw_question"], *options, x["prediction"], x.get("answer", "")])
    return ".xlsx", xlsx.workbook(rows)


TASK = benchmark.Benchmark(
    "mmbench",
    load,
    (1, 1),
    PROMPT,
    16,
    score,
    expand=expand,
    submission=submission,
    multiple_choice=True,
    needs_image_root=False,
)
