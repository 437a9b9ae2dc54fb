"""The grain input pipeline: source records -> decoded, tokenized, masked, padded numpy batches.

Batches are ``{"images": f32[B, N, H, W, 3], "tokens": i32[B, L], "targets": i32[B, L],
"loss_mask": f32[B, L], "attention_mask": i32[B, L]}``: right padded to ``max_length``, ``targets`` the
tokens shifted left by one, ``loss_mask`` 1 where the target is a learned (answer) token.

The iterator is a grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` resume it exactly, so
the state goes into the training checkpoint. Each host reads only its ``1/process_count`` of the records.
Bad examples (unreadable images, malformed records, too long) are skipped and counted by reason in the
``skipped`` Counter; with ``num_workers > 0`` the map step runs in other processes and those counts are
not seen here (run with ``num_workers=0`` to audit a dataset).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from mllm_jax.data.sources import (
    QUESTION_TYPES,
    LlavaJsonSource,
    SyntheticSource,
    WebDatasetSource,
    pick_question,
)
from mllm_jax.data.synthetic import SyntheticConfig, make_example
from mllm_jax.data.templates import IMAGE, encode_conversation
from mllm_jax.data.transforms import BadExample, ImageSpec, load_image

SOURCES = ("synthetic", "llava_json", "webdataset")
SHUFFLE_WINDOW = 1_000  # webdataset: records shuffled within this window on top of the shard order


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic" | "llava_json" | "webdataset"
    task: str = "vqa"  # synthetic only: "caption" | "vqa"
    path: str = ""  # llava_json file or webdataset shard dir/glob
    image_root: str = ""  # llava_json: image folder
    template: str = "tiny"  # a templates.TEMPLATES key or "chat"
    max_length: int = 64  # tokens per sample incl. image tokens; padded to it, truncated beyond
    max_images: int = 1  # images per sample (padded with zero images)
    num_workers: int = 0  # grain worker processes (0 = in-process)
    shuffle: bool = True
    split: str = "train"  # synthetic: "train" | "heldout"
    size: int = 100_000  # synthetic: records per epoch


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    image_token_id: int
    tokens_per_image: int


class Encoder:
    """Raw record -> one padded example, or None (counted in ``skipped``) for a bad example."""

    def __init__(self, data: DataConfig, tokenizer, image: ImageSpec, model: ModelSpec, skipped=None):
        self.data, self.tokenizer, self.image, self.model = data, tokenizer, image, model
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.skipped = skipped
        self._lock = threading.Lock()  # grain's in-process reader maps on several threads
        self._bad_streak = 0
        self._encode_turns = self._make_cache()

    def _make_cache(self):
        # Tokenizing through transformers costs ~0.2 ms a conversation; synthetic and caption data
        # repeat the same texts, so a bounded cache keyed by the turns pays off (results are read-only).
        def encode_turns(turns: tuple) -> tuple[np.ndarray, np.ndarray]:
            m = self.model
            return encode_conversation(
                self.data.template, self.tokenizer, list(turns), m.image_token_id, m.tokens_per_image
            )

        return functools.lru_cache(maxsize=8192)(encode_turns)

    def __getstate__(self) -> dict:
        # Worker processes get a copy without the counter: a Counter there would count unseen.
        state = dict(self.__dict__, skipped=None)
        del state["_lock"], state["_encode_turns"]
        return state

    def __setstate__(self, state: dict):
        self.__dict__.update(state, _lock=threading.Lock())
        self._encode_turns = self._make_cache()

    # Skipping never ends when every example is bad (wrong image_root, wrong template): fail instead.
    MAX_BAD_STREAK = 10_000

    def __call__(self, record: dict) -> dict | None:
        try:
            example = self.encode(record)
        except BadExample as e:
            with self._lock:
                if self.skipped is not None:
                    self.skipped[e.reason] += 1
                self._bad_streak += 1
                if self._bad_streak >= self.MAX_BAD_STREAK:
                    raise ValueError(f"{self._bad_streak} bad examples in a row, the last: {e}") from e
            return None
        self._bad_streak = 0
        return example

    def encode(self, record: dict) -> dict:
        if "error" in record:
            raise BadExample(record["error"])
        images, turns = record.get("images", []), record.get("turns")
        if not turns:
            raise BadExample("no_turns")
        placeholders = sum(text.count(IMAGE) for role, text in turns if role == "user")
        if placeholders != len(images):
            raise BadExample("image_count_mismatch", f"{placeholders} {IMAGE} for {len(images)} images")
        if len(images) > self.data.max_images:
            raise BadExample("too_many_images")
        m, length = self.model, self.data.max_length
        tokens, learn = self._encode_turns(tuple(tuple(turn) for turn in turns))
        if len(tokens) > length:
            # A partial image block would misalign features and placeholders: drop instead of cutting.
            if (tokens[length:] == m.image_token_id).any():
                raise BadExample("too_long")
            tokens, learn = tokens[:length], learn[:length]
        if not learn[1:].any():  # position 0 is never a target
            raise BadExample("no_targets")
        # Decode last: the cheap checks above reject examples before paying for their images.
        size = self.image.size
        pixels = np.zeros((self.data.max_images, size, size, 3), np.float32)
        for k, im in enumerate(images):
            pixels[k] = self.image(load_image(im))
        return pad_example(tokens, learn, length, self.pad_id) | {"images": pixels}


def pad_example(tokens: np.ndarray, learn: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """``tokens i32[T]``, ``learn bool[T]`` (T <= length) -> the per-example arrays of a batch."""
    n = len(tokens)
    out_tokens = np.full(length, pad_id, np.int32)
    out_tokens[:n] = tokens
    targets = np.full(length, pad_id, np.int32)
    targets[:-1] = out_tokens[1:]
    loss_mask = np.zeros(length, np.float32)
    loss_mask[: n - 1] = learn[1:n]
    attention = np.zeros(length, np.int32)
    attention[:n] = 1
    return {"tokens": out_tokens, "targets": targets, "loss_mask": loss_mask, "attention_mask": attention}


class _ShardStream(grain.IterDataset):
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

    def __iter__(self) -> _ShardStreamIterator:
        return _ShardStreamIterator(self)


class _ShardStreamIterator(grain.DatasetIterator):
    def __init__(self, ds: _ShardStream):
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


def _not_none(x: Any) -> bool:
    return x is not None


def make_iterator(
    data: DataConfig,
    tokenizer,
    image: ImageSpec,
    model: ModelSpec,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    skipped: collections.Counter | None = None,
    synthetic_config: SyntheticConfig | None = None,
) -> grain.DatasetIterator:
    """Infinite iterator over batches for this host (see the module docstring for the batch layout).

    ``batch_size`` is per host. Epochs repeat with a new shuffle order. ``skipped`` (if given) counts
    dropped examples by reason, in this process only (``num_workers == 0``), including prefetched ones.
    ``synthetic_config`` is the scene generator of ``source="synthetic"`` (default ``SyntheticConfig()``).
    With ``num_workers > 0``, call ``close()`` on the iterator when done to stop the worker processes.
    """
    if data.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {data.source!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
    if skipped is not None and data.num_workers > 0:
        logging.warning("num_workers > 0: bad examples are dropped in the workers but not counted here")
    encoder = Encoder(data, tokenizer, image, model, skipped)
    if data.source == "webdataset":
        stream = _ShardStream(WebDatasetSource(data.path).shards, seed, data.shuffle)
        stream.split(process_index, process_count)
        ds: grain.IterDataset = stream
        if data.shuffle:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=SHUFFLE_WINDOW, seed=seed)
        ds = ds.map(encoder).filter(_not_none)
    else:
        if data.source == "synthetic":
            config = synthetic_config or SyntheticConfig()
            source: Any = SyntheticSource(config, data.split, data.task, data.size)
        else:
            source = LlavaJsonSource(data.path, data.image_root)
        records = grain.MapDataset.source(source)[process_index::process_count]
        if len(records) == 0:
            raise ValueError(f"no records for process {process_index} of {process_count}")
        if data.shuffle:
            records = records.shuffle(seed=seed)
        # repeat() reseeds the shuffle every epoch; map returns None for bad examples, which
        # to_iter_dataset drops (the index stays a plain integer, so the state is still exact).
        mapped = records.repeat().map(encoder)
        read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(32, 2 * batch_size))
        ds = mapped.to_iter_dataset(read)
    ds = ds.batch(batch_size, drop_remainder=True)
    if data.num_workers > 0:
        # grain's workers read absl flags; outside an absl app (tests, notebooks) they are unparsed,
        # which grain treats as an error rather than "use the defaults".
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return iter(ds)


def heldout_questions(config: SyntheticConfig, n: int) -> list[dict]:
    """``n`` deterministic held-out VQA items ``{"image", "question", "answer", "type"}``, the question
    types interleaved in ``QUESTION_TYPES`` order so any prefix is balanced too."""
    per_type: dict[str, list[dict]] = {t: [] for t in QUESTION_TYPES}
    want = {t: n // len(QUESTION_TYPES) + (i < n % len(QUESTION_TYPES)) for i, t in enumerate(QUESTION_TYPES)}
    index = 0
    while any(len(per_type[t]) < want[t] for t in QUESTION_TYPES):
        if index > 100 * n + 1000:
            raise ValueError(f"could not find {want} held-out questions for {config}")
        ex = make_example(config, "heldout", index)
        # One question per image so items are independent; rotate the preferred type like training.
        q = pick_question(ex["questions"], QUESTION_TYPES[index % len(QUESTION_TYPES)], index)
        if len(per_type[q["type"]]) < want[q["type"]]:
            per_type[q["type"]].append({"image": ex["image"], **q})
        index += 1
    out = []
    for k in range(max(want.values(), default=0)):
        out += [per_type[t][k] for t in QUESTION_TYPES if k < len(per_type[t])]
    return out
