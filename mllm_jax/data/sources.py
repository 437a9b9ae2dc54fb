"""Record sources: raw training records from the built-in synthetic data, LLaVA JSON, MMC4 JSONL and
webdataset tars (``webdataset.py``).

Every source yields conversation records ``{"images": [...], "turns": [(role, text), ...]}`` with roles
``"user"`` / ``"assistant"`` and one ``<image>`` placeholder per image in the user text, or interleaved
document records ``{"document": [("text", str) | ("image", image), ...]}`` (see ``interleaved.py``).
Records from files carry ``"where"`` (``file:line``, ``file[index]`` or ``shard:key``) so a skipped
record can be found again. An image is anything
``transforms.load_image`` accepts (uint8 array, encoded bytes, file path): decoding is deferred to the
pipeline's map step, which runs in worker processes and skips what fails there. A record that is
malformed at the source is returned as ``{"error": reason}`` instead, so it is skipped and counted by
the same code path rather than crashing the run.

Map-style sources (``__len__`` / ``__getitem__``) keep the iterator state an integer; the webdataset
source is a stream over tar shards (``ShardStream`` checkpoints a position inside a shard).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mllm_jax import paths
from mllm_jax.data.config import SYNTHETIC_TASKS
from mllm_jax.data.existence import existence_record, preference_record
from mllm_jax.data.grounding import grounding_record, referring_record
from mllm_jax.data.interleaved import interleaved_caption, interleaved_vqa, mmc4_document, vqa_turns
from mllm_jax.data.layouts import IMAGE
from mllm_jax.data.synthetic import (
    QUESTION_TYPES,
    SyntheticConfig,
    make_example,
    pick_question,
    retrieval_record,
)
from mllm_jax.data.transforms import safe_join
from mllm_jax.data.video import clip_record
from mllm_jax.errors import BadExample

Record = dict[str, Any]
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _caption(config: SyntheticConfig, split: str, index: int, max_images: int) -> Record:
    ex = make_example(config, split, index)
    return {"images": [ex["image"]], "turns": [("user", IMAGE), ("assistant", ex["caption"])]}


def _vqa(config: SyntheticConfig, split: str, index: int, max_images: int) -> Record:
    ex = make_example(config, split, index)
    q = pick_question(ex["questions"], QUESTION_TYPES[index % len(QUESTION_TYPES)], index)
    return {"images": [ex["image"]], "turns": vqa_turns(q)}


# task -> (config, split, index, max_images) -> record
TASK_RECORDS = {
    "caption": _caption,
    "vqa": _vqa,
    "interleaved": interleaved_vqa,
    "interleaved_caption": interleaved_caption,
    "grounding": grounding_record,
    "referring": referring_record,
    "video": clip_record,
    "existence": existence_record,  # yes / no object-existence questions (existence.py)
    "preference": preference_record,  # chosen / rejected pairs for a DPO stage (existence.py)
    "retrieval": retrieval_record,  # a located caption, [RET], then its image (FROMAGe; synthetic.py)
}
assert set(TASK_RECORDS) == set(SYNTHETIC_TASKS)


class SyntheticSource:
    """``size`` records generated on the fly from ``synthetic.make_example`` (index ``i`` -> record ``i``).

    ``"vqa"`` asks one question per example, rotating through the question types (falling back to an
    available type when an image has no unique answer for the rotated one), so types stay balanced and
    each record is a pure function of its index. ``"interleaved"`` / ``"interleaved_caption"`` hold
    2..``max_images`` images (``interleaved.py``).
    """

    def __init__(
        self,
        config: SyntheticConfig,
        split: str = "train",
        task: str = "vqa",
        size: int = 100_000,
        max_images: int = 1,
    ):
        if task not in TASK_RECORDS:
            raise ValueError(f"task must be one of {SYNTHETIC_TASKS}, got {task!r}")
        if task in ("interleaved", "interleaved_caption") and max_images < 2:
            raise ValueError(f"task {task!r} needs max_images >= 2, got {max_images}")
        if task == "video" and max_images < config.num_frames:
            raise ValueError(
                f"task 'video' needs max_images >= num_frames ({config.num_frames}), got {max_images}"
            )
        self.config, self.split, self.task, self.size = config, split, task, size
        self.max_images = max_images

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Record:
        return TASK_RECORDS[self.task](self.config, self.split, int(index), self.max_images)


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


class JsonRecords:
    """The records of a JSON file holding a list, or of a JSONL file (one object a line), by index.

    Kept as one compact UTF-8 blob plus offsets rather than as Python dicts: a 665K-record file then
    costs about its own size in memory instead of several times that. A JSONL line that does not parse
    becomes a ``bad_json`` error record rather than failing the run; ``where(i)`` names the record.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with paths.open_file(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read data file {path!r}: {e}") from None
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                raws = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            chunks = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() for r in raws]
            self._lines = None
        else:
            numbered = [(n + 1, line) for n, line in enumerate(text.splitlines()) if line.strip()]
            chunks = [line.encode() for _, line in numbered]  # parsed on access: a bad line is one record
            self._lines = np.asarray([n for n, _ in numbered], np.int64)
        del text, stripped
        self._offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(chunks), np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, index: int) -> Any:
        """The parsed record, or ``None`` for a JSONL line that is not JSON."""
        start, end = self._offsets[index], self._offsets[index + 1]
        try:
            return json.loads(self._blob[start:end].tobytes())
        except json.JSONDecodeError:
            return None

    def where(self, index: int) -> str:
        return f"{self.path}[{index}]" if self._lines is None else f"{self.path}:{self._lines[index]}"


class LlavaJsonSource:
    """LLaVA-format JSON (a list) or JSONL file, e.g. ``blip_laion_cc_sbu_558k.json`` and
    ``llava_v1_5_mix665k.json`` as downloaded; image paths are relative to ``image_root``."""

    def __init__(self, path: str, image_root: str = ""):
        self.path, self.image_root = path, image_root
        self._records = JsonRecords(path)

    def __len__(self) -> int:
        return len(self._records)

    def raw(self, index: int) -> Any:
        return self._records.raw(index)

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        raw = self._records.raw(index)
        record = {"error": "bad_json"} if raw is None else llava_record(raw, self.image_root)
        return record | {"where": self._records.where(index)}


def _image_path(image_root: str, name: Any) -> str | dict:
    try:
        return safe_join(image_root, name)
    except BadExample as e:
        return {"error": e.reason, "detail": str(e)}


class Mmc4Source:
    """MMC4-style interleaved documents from a JSONL file (one ``{"text_list", "image_info"}`` object a
    line, ``image_info[i].image_name`` relative to ``image_root``); see ``interleaved.mmc4_document``."""

    def __init__(self, path: str, image_root: str = ""):
        self.path, self.image_root = path, image_root
        self._records = JsonRecords(path)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        raw = self._records.raw(index)
        if raw is None:
            record = {"error": "bad_json"}
        else:
            record = mmc4_document(raw, lambda info: _image_path(self.image_root, info.get("image_name")))
        return record | {"where": self._records.where(index)}
