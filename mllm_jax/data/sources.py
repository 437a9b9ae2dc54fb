"""Record sources: raw training records from the built-in synthetic data, LLaVA JSON and webdataset tars.

Every source yields records ``{"images": [...], "turns": [(role, text), ...]}`` with roles ``"user"`` /
``"assistant"`` and one ``<image>`` placeholder per image in the user text. An image is anything
``transforms.load_image`` accepts (uint8 array, encoded bytes, file path): decoding is deferred to the
pipeline's map step, which runs in worker processes and skips what fails there. A record that is
malformed at the source is returned as ``{"error": reason}`` instead, so it is skipped and counted by
the same code path rather than crashing the run.

Map-style sources (``__len__`` / ``__getitem__``) keep the iterator state an integer; the webdataset
source is a stream over tar shards (it exposes ``shards`` and ``iter_shard`` so the pipeline can
checkpoint a position inside a shard).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from mllm_jax.data.synthetic import QUESTION_TYPES, SyntheticConfig, make_example
from mllm_jax.data.templates import IMAGE
from mllm_jax.data.transforms import BadExample, safe_join

Record = dict[str, Any]
SYNTHETIC_TASKS = ("caption", "vqa")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class SyntheticSource:
    """``size`` records generated on the fly from ``synthetic.make_example`` (index ``i`` -> example ``i``).

    ``"vqa"`` asks one question per example, rotating through the question types (falling back to an
    available type when an image has no unique answer for the rotated one), so types stay balanced and
    each record is a pure function of its index.
    """

    def __init__(self, config: SyntheticConfig, split: str = "train", task: str = "vqa", size: int = 100_000):
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"task must be one of {SYNTHETIC_TASKS}, got {task!r}")
        self.config, self.split, self.task, self.size = config, split, task, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Record:
        ex = make_example(self.config, self.split, int(index))
        if self.task == "caption":
            turns = [("user", IMAGE), ("assistant", ex["caption"])]
        else:
            q = pick_question(ex["questions"], QUESTION_TYPES[int(index) % len(QUESTION_TYPES)], int(index))
            turns = [("user", f"{IMAGE} {q['question']}"), ("assistant", q["answer"])]
        return {"images": [ex["image"]], "turns": turns}


def pick_question(questions: list[dict], qtype: str, index: int) -> dict:
    for q in questions:
        if q["type"] == qtype:
            return q
    return questions[index % len(questions)]


def llava_record(raw: Any, image_root: str) -> Record:
    """One LLaVA JSON record (``{id, image?, conversations}``) -> a source record (or an error record)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
        return {"error": "no_conversations"}
    turns = []
    for turn in raw["conversations"]:
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_NAMES:
            return {"error": "bad_turns"}
        turns.append((ROLE_NAMES[turn["from"]], str(turn.get("value", ""))))
    # LLaVA's own loader drops a leading assistant turn (some ShareGPT conversations start with one).
    if turns and turns[0][0] == "assistant":
        turns = turns[1:]
    image = raw.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    try:
        images = [safe_join(image_root, name) for name in names]
    except BadExample as e:
        return {"error": e.reason}
    n_placeholders = sum(text.count(IMAGE) for role, text in turns if role == "user")
    if len(images) == 1 and n_placeholders <= 1 and turns:
        # As LLaVA's preprocess_multimodal: the image goes first in its turn ("...\n<image>" in the 558K
        # file becomes "<image>\n..."), and an image record without a placeholder gets one up front.
        k = next((i for i, (_, text) in enumerate(turns) if IMAGE in text), 0)
        role, text = turns[k]
        turns[k] = (role, (IMAGE + "\n" + text.replace(IMAGE, "").strip()).strip())
    return {"images": images, "turns": turns, "id": str(raw.get("id", ""))}


class LlavaJsonSource:
    """LLaVA-format JSON (a list) or JSONL file, e.g. ``blip_laion_cc_sbu_558k.json`` and
    ``llava_v1_5_mix665k.json`` as downloaded; image paths are relative to ``image_root``.

    Records are kept as one compact UTF-8 blob plus offsets rather than as Python dicts: a 665K-record
    file then costs about its own size in memory instead of several times that.
    """

    def __init__(self, path: str, image_root: str = ""):
        self.path, self.image_root = path, image_root
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            raws = json.loads(stripped)
        else:
            raws = [json.loads(line) for line in text.splitlines() if line.strip()]
        chunks = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() for r in raws]
        del raws, text, stripped
        self._offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(chunks), np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, index: int) -> Any:
        start, end = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._blob[start:end].tobytes())

    def __getitem__(self, index: int) -> Record:
        return llava_record(self.raw(int(index)), self.image_root)


def expand_braces(pattern: str) -> list[str]:
    """``"shards/{00000..00003}.tar"`` -> the four names (webdataset's brace notation, zero padded)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [n for i in range(int(lo), int(hi) + 1) for n in expand_braces(f"{head}{i:0{width}d}{tail}")]


def list_shards(pattern_or_dir: str) -> list[str]:
    """Sorted shard paths from a directory (its ``*.tar``), a glob, or a brace pattern."""
    if os.path.isdir(pattern_or_dir):
        paths = glob.glob(os.path.join(pattern_or_dir, "*.tar"))
    else:
        paths = [p for pat in expand_braces(pattern_or_dir) for p in glob.glob(pat)]
    return sorted(set(paths))


def _sample_key(name: str) -> tuple[str, str]:
    # webdataset convention: the key is the path up to the first dot of the basename, the rest the field.
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(folder, key), ext.lower()


def _to_record(key: str, fields: dict[str, bytes]) -> Record:
    image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
    if image is None:
        return {"error": "missing_image", "key": key}
    if "txt" not in fields:
        return {"error": "missing_caption", "key": key}
    caption = fields["txt"].decode("utf-8", errors="replace").strip()
    return {"images": [image], "turns": [("user", IMAGE), ("assistant", caption)], "key": key}


class WebDatasetSource:
    """Image-caption pairs from webdataset tar shards as img2dataset writes them (``KEY.jpg``,
    ``KEY.txt``, ``KEY.json``). Iterating yields every sample of every shard in sorted shard order."""

    def __init__(self, pattern_or_dir: str):
        self.shards = list_shards(pattern_or_dir)
        if not self.shards:
            raise ValueError(f"no .tar shards found at {pattern_or_dir!r}")

    def __iter__(self) -> Iterator[Record]:
        for shard in self.shards:
            yield from self.iter_shard(shard)

    @staticmethod
    def iter_shard(shard: str, skip: int = 0) -> Iterator[Record]:
        """Samples of one shard in file order, the first ``skip`` omitted (used to resume mid-shard).

        Members of a sample are contiguous in img2dataset tars, so samples stream without an index. A
        truncated or unreadable shard ends early with an error record rather than raising.
        """
        count = 0
        key, fields = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _sample_key(member.name)
                    if k != key and key is not None:
                        if count >= skip:
                            yield _to_record(key, fields)
                        count += 1
                        fields = {}
                    key = k
                    # Only the fields we use are read; a sample's other members are skipped unread.
                    if ext in IMAGE_EXTENSIONS or ext == "txt":
                        f = tar.extractfile(member)
                        fields[ext] = f.read() if f is not None else b""
            if key is not None and count >= skip:
                yield _to_record(key, fields)
        except (tarfile.TarError, OSError, EOFError) as e:
            if count >= skip:
                yield {"error": "bad_shard", "key": f"{shard}: {e}"}
