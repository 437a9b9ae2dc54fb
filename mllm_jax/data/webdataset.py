"""Webdataset tar shards as a record stream: ``{key}.{ext}`` files grouped into samples (an image and a
``.txt`` caption, or a ``.json`` conversation), read shard by shard; ``ShardStream`` checkpoints its
position inside a shard so a resumed run reads on where it stopped."""

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

from mllm_jax import paths
from mllm_jax.data.interleaved import mmc4_document
from mllm_jax.data.layouts import IMAGE

Record = dict[str, Any]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
    if paths.is_remote(pattern_or_dir):  # a bucket: its folder's *.tar, or a pattern in one folder
        if paths.isdir(pattern_or_dir):
            return paths.glob(pattern_or_dir, "*.tar")
        found = [p for pat in expand_braces(pattern_or_dir) for p in paths.glob(*pat.rsplit("/", 1))]
        return sorted(set(found))
    if os.path.isdir(pattern_or_dir):
        found = glob.glob(os.path.join(pattern_or_dir, "*.tar"))
    else:
        found = [p for pat in expand_braces(pattern_or_dir) for p in glob.glob(pat)]
    return sorted(set(found))


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
            with paths.open_file(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
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
