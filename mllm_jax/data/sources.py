"""Record sources: raw training records from the built-in synthetic data, LLaVA JSON and webdataset tars.

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

import base64
import binascii
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from mllm_jax.data.config import SYNTHETIC_TASKS
from mllm_jax.data.grounding import grounding_record, referring_record
from mllm_jax.data.interleaved import interleaved_caption, interleaved_vqa, mmc4_document, vqa_turns
from mllm_jax.data.layouts import IMAGE
from mllm_jax.data.synthetic import QUESTION_TYPES, SyntheticConfig, make_example, pick_question
from mllm_jax.data.transforms import safe_join
from mllm_jax.data.video import clip_record
from mllm_jax.errors import BadExample

Record = dict[str, Any]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
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
            with open(path, "rb") as f:
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


def _wanted(ext: str) -> bool:
    # Only the fields we use are read; a sample's other members are skipped unread. "0.jpg": an image
    # of an interleaved sample, named in its json.
    return ext in ("txt", "json") or ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _tar_image(key: str, fields: dict[str, bytes], info: dict) -> bytes | dict:
    """The image an ``image_info`` entry names: a member of the sample (``"0.jpg"`` or ``"KEY.0.jpg"``),
    or inline ``image_base64`` as OpenFlamingo's MMC4 shards store it."""
    inline = info.get("image_base64")
    if isinstance(inline, str):
        try:
            return base64.b64decode(inline, validate=True)
        except (binascii.Error, ValueError):
            return {"error": "bad_image", "detail": f"{key}: bad image_base64"}
    name = info.get("image_name")
    if not isinstance(name, str):
        return {"error": "missing_image", "detail": f"{key}: image_info without image_name"}
    name = name.lower()
    prefix = os.path.basename(key).lower() + "."
    field = name[len(prefix) :] if name.startswith(prefix) else name
    if field not in fields:
        return {"error": "missing_image", "detail": f"{key}: no member {name!r}"}
    return fields[field]


def _to_record(key: str, fields: dict[str, bytes]) -> Record:
    """A sample -> an interleaved document (its json has MMC4's ``text_list``) or an image-text pair."""
    meta = None
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None  # a pair's metadata is optional: a broken one does not spoil the pair
    if isinstance(meta, dict) and "text_list" in meta:
        return mmc4_document(meta, lambda info: _tar_image(key, fields, info)) | {"key": key}
    image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
    if image is None:
        return {"error": "missing_image", "key": key}
    if "txt" not in fields:
        return {"error": "missing_caption", "key": key}
    caption = fields["txt"].decode("utf-8", errors="replace").strip()
    return {"images": [image], "turns": [("user", IMAGE), ("assistant", caption)], "key": key}


class WebDatasetSource:
    """Webdataset tar shards. A sample is an image-caption pair as img2dataset writes them (``KEY.jpg``,
    ``KEY.txt``, ``KEY.json``), or an interleaved document: ``KEY.json`` in the MMC4 structure plus the
    image members it names (``KEY.0.jpg`` named ``"0.jpg"``), or its images inline as ``image_base64``.
    Both kinds may share a shard. Iterating yields every sample of every shard in sorted shard order."""

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
                            yield _to_record(key, fields) | {"where": f"{shard}:{key}"}
                        count += 1
                        fields = {}
                    key = k
                    if _wanted(ext):
                        f = tar.extractfile(member)
                        fields[ext] = f.read() if f is not None else b""
            if key is not None and count >= skip:
                yield _to_record(key, fields) | {"where": f"{shard}:{key}"}
        except (tarfile.TarError, OSError, EOFError) as e:
            if count >= skip:
                yield {"error": "bad_shard", "key": f"{shard}: {e}", "where": shard}


class ShardStream(grain.IterDataset):
    """Records of webdataset shards, forever: shard order reshuffled every epoch, checkpointable by
    (epoch, shard position, records read in the shard). Splits across hosts/workers by shard when there
    are enough shards (each reads only its tars), else by record (each reads every tar)."""

    def __init__(self, shards: list[str], seed: int, shuffle: bool):
        super().__init__()
        self.shards, self.seed, self.shuffle = list(shards), seed, shuffle
        self.start, self.step = 0, 1

    def split(self, index: int, count: int) -> None:
        if count <= 1:
            return
        if self.step == 1 and len(self.shards) >= count:
            self.shards = self.shards[index::count]
        else:  # compose record slices: keep record r of the epoch when r % step == start
            self.start, self.step = self.start + self.step * index, self.step * count

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        # Called by grain on the worker's copy of the dataset under mp_prefetch.
        del sequential_slice
        self.split(sl.start or 0, sl.step or 1)

    def __iter__(self) -> ShardStreamIterator:
        return ShardStreamIterator(self)


class ShardStreamIterator(grain.DatasetIterator):
    def __init__(self, ds: ShardStream):
        super().__init__()
        self._ds = ds
        self._state = {"epoch": 0, "pos": 0, "offset": 0, "count": 0, "kept": 0}
        self._records: Iterator[dict] | None = None

    def _shard(self) -> str:
        order = np.arange(len(self._ds.shards))
        if self._ds.shuffle:
            order = np.random.default_rng([self._ds.seed, self._state["epoch"]]).permutation(order)
        return self._ds.shards[order[self._state["pos"]]]

    def __next__(self) -> dict:
        s, ds = self._state, self._ds
        while True:
            if s["pos"] == len(ds.shards):
                if s["kept"] == 0:
                    raise ValueError(f"webdataset shards yield no records for this slice: {ds.shards[:3]}...")
                s.update(epoch=s["epoch"] + 1, pos=0, offset=0, count=0, kept=0)
            if self._records is None:
                self._records = WebDatasetSource.iter_shard(self._shard(), skip=s["offset"])
            record = next(self._records, None)
            if record is None:
                self._records = None
                s.update(pos=s["pos"] + 1, offset=0)
                continue
            s["offset"] += 1
            s["count"] += 1
            if (s["count"] - 1) % ds.step == ds.start:
                s["kept"] += 1
                return record

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        self._state = dict(state)
        self._records = None
