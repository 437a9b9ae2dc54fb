"""The grain input pipeline: source records -> decoded, tokenized, masked, padded numpy batches.

Batches are ``{"images": f32[B, N, H, W, 3], "tokens": i32[B, L], "targets": i32[B, L],
"loss_mask": f32[B, L], "attention_mask": i32[B, L]}``: right padded to ``max_length``, ``targets`` the
tokens shifted left by one, ``loss_mask`` 1 where the target is a learned (answer or document text)
token. With ``data.text_length > 0`` they also hold ``text_tokens`` / ``text_mask`` ``i32[B, text_length]``:
the example's text (caption, question + answer, document text) for BLIP-2's Q-Former, BOS first, right
padded. Images are laid out in the tokens as ``ModelSpec.layout`` says (``layouts.py``).

The iterator is a grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` resume it exactly, so
the state goes into the training checkpoint. Each host reads only its rows of each global batch.
Bad examples (unreadable images, malformed records, too long, unsafe paths) are skipped and counted by
reason in the ``skipped`` Counter, and the run fails if too many are (``DataConfig.max_skipped_fraction``);
with ``num_workers > 0`` the map step runs in other processes and those counts are not seen here (run
with ``num_workers=0`` to audit a dataset).
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from mllm_jax.data import packing
from mllm_jax.data.config import SOURCES, DataConfig
from mllm_jax.data.fewshot import heldout_questions, support_questions
from mllm_jax.data.layouts import IMAGE, ModelSpec, as_spec, truncate
from mllm_jax.data.preference import PreferenceJsonSource, encode_pair, is_pair
from mllm_jax.data.sources import LlavaJsonSource, Mmc4Source, SyntheticSource
from mllm_jax.data.synthetic import SyntheticConfig
from mllm_jax.data.templates import encode_conversation, encode_document, render_text
from mllm_jax.data.transforms import ImageSpec, load_image
from mllm_jax.data.webdataset import ShardStream, WebDatasetSource
from mllm_jax.errors import BadExample, DataError

__all__ = [
    "SOURCES",
    "DataConfig",
    "Encoder",
    "ModelSpec",
    "heldout_questions",
    "make_iterator",
    "pad_example",
    "support_questions",
]

SHUFFLE_WINDOW = 1_000  # webdataset: records shuffled within this window on top of the shard order
MIX_SEED_STRIDE = 1_000_003  # mix component i shuffles with seed + i * stride: independent orders


MIN_RECORDS_FOR_FRACTION = 200  # max_skipped_fraction is judged only on this many records or more


class Encoder:
    """Raw record -> one padded example, or None (counted in ``skipped``) for a bad example.

    Besides the per-reason ``skipped`` counts it fails the run, with a message naming the reasons and
    a few records, when every example is bad (``MAX_BAD_STREAK`` in a row) or when more than
    ``data.max_skipped_fraction`` of the records read so far were skipped (judged from
    ``MIN_RECORDS_FOR_FRACTION`` records on). Images dropped from a document that is kept are counted
    in ``skipped`` by reason too, but are not skipped records.
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer,
        image: ImageSpec,
        model: ModelSpec,
        skipped=None,
        text_tokenizer=None,
    ):
        self.data, self.tokenizer, self.image, self.model = data, tokenizer, image, as_spec(model)
        if data.max_images % self.model.frames_per_image:  # clips must fill whole image slots
            raise DataError(
                f"data.max_images={data.max_images} is not a multiple of the model's "
                f"{self.model.frames_per_image} frames per clip"
            )
        self.text_tokenizer = text_tokenizer if text_tokenizer is not None else tokenizer
        self.pad_id = _pad_id(tokenizer)
        self.text_pad_id = _pad_id(self.text_tokenizer)
        self.skipped = skipped
        self._lock = threading.Lock()  # grain's in-process reader maps on several threads
        self._bad_streak = 0
        self._read = 0
        self._bad: collections.Counter = collections.Counter()
        self._examples: list[str] = []  # where the first few skipped records are
        self._make_caches()

    def _make_caches(self):
        # Tokenizing through transformers costs ~0.2 ms a conversation; synthetic and caption data
        # repeat the same texts, so bounded caches keyed by the text pay off (results are read-only).
        def encode_turns(turns: tuple) -> tuple[np.ndarray, np.ndarray]:
            return encode_conversation(self.data.template, self.tokenizer, list(turns), self.model)

        def text_ids(text: str) -> np.ndarray:
            tok = self.text_tokenizer
            ids = list(tok.encode(text, add_special_tokens=True))
            if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
                ids.insert(0, tok.bos_token_id)
            return np.asarray(ids, np.int32)

        self._encode_turns = functools.lru_cache(maxsize=8192)(encode_turns)
        self._text_ids = functools.lru_cache(maxsize=8192)(text_ids)

    def __getstate__(self) -> dict:
        # Worker processes get a copy without the counter: a Counter there would count unseen.
        state = dict(self.__dict__, skipped=None)
        del state["_lock"], state["_encode_turns"], state["_text_ids"]
        return state

    def __setstate__(self, state: dict):
        self.__dict__.update(state, _lock=threading.Lock())
        self._make_caches()

    # Skipping never ends when every example is bad (wrong image_root, wrong template): fail instead.
    MAX_BAD_STREAK = 10_000

    def __call__(self, record: dict) -> dict | None:
        try:
            example = self.encode(record)
        except BadExample as e:
            self._skip(e, record)
            return None
        with self._lock:
            self._read += 1
            self._bad_streak = 0
        return example

    def _skip(self, e: BadExample, record: Any) -> None:
        with self._lock:
            self._read += 1
            self._bad[e.reason] += 1
            if self.skipped is not None:
                self.skipped[e.reason] += 1
            where = (record.get("where") or record.get("key")) if isinstance(record, dict) else None
            if where and len(self._examples) < 3:
                self._examples.append(f"{where} ({e.reason})")
            self._bad_streak += 1
            if self._bad_streak >= self.MAX_BAD_STREAK:
                raise DataError(f"{self._bad_streak} bad examples in a row, the last: {e}") from e
            bad, read, limit = sum(self._bad.values()), self._read, self.data.max_skipped_fraction
            if read >= MIN_RECORDS_FOR_FRACTION and bad > limit * read:
                reasons = ", ".join(f"{r} {n}" for r, n in self._bad.most_common(3))
                examples = "; e.g. " + ", ".join(self._examples) if self._examples else ""
                raise DataError(
                    f"{bad} of {read} records skipped ({bad / read:.1%} > data.max_skipped_fraction="
                    f"{limit}): {reasons}{examples}. Check data.path / image_root / template, or raise "
                    "max_skipped_fraction"
                ) from e

    def _count_image(self, reason: str) -> None:
        if self.skipped is not None:
            with self._lock:
                self.skipped[reason] += 1

    def encode(self, record: dict) -> dict:
        if "error" in record:
            raise BadExample(record["error"], record.get("detail", ""))
        if "document" in record:
            return self._document(record["document"])
        if is_pair(record):  # a DPO stage's chosen / rejected pair: both rows of one example
            return encode_pair(self.encode, record)
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
            # A partial image block would misalign features and placeholders, and dropping an image
            # would leave its question unanswerable: drop the example instead of cutting it.
            if (tokens[length:] == m.image_token_id).any():
                raise BadExample("too_long")
            tokens, learn = tokens[:length], learn[:length]
        if not learn[1:].any():  # position 0 is never a target
            raise BadExample("no_targets")
        # Decode last: the cheap checks above reject examples before paying for their images.
        pixels = [self.image(load_image(im)) for im in images]
        if self.data.text_source == "prompt":  # up to the last user turn, rendered as a prompt
            last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=-1)
            text = render_text(self.data.template, self.tokenizer, list(turns[: last_user + 1]))
        else:
            text = " ".join(text for _, text in turns)
        return self._example(tokens, learn, pixels, " ".join(text.replace(IMAGE, " ").split()))

    def _document(self, items: Any) -> dict:
        """Images that fail are dropped (counted); the document is cut before its image number
        ``max_images + 1`` (the text after it is about an image the model would not see), and at
        ``max_length`` tokens without leaving a partial image block (images past the cut are dropped)."""
        if not isinstance(items, list | tuple):
            raise BadExample("bad_document", "document must be a list of (kind, value) items")
        kept, pixels = [], []
        for item in items:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise BadExample("bad_document", f"bad document item {item!r:.80}")
            if item[0] == "image":
                if len(pixels) == self.data.max_images:
                    break
                try:
                    pixels.append(self.image(load_image(_image(item[1]))))
                except BadExample as e:
                    self._count_image(e.reason)
                    continue
                item = ("image", None)
            kept.append(tuple(item))
        if not pixels:
            raise BadExample("no_images")
        tokens, learn = encode_document(self.tokenizer, kept, self.model)
        tokens, learn, n_images = truncate(tokens, learn, self.data.max_length, self.model)
        if not learn[1:].any():
            raise BadExample("no_targets")
        text = " ".join(value for kind, value in kept if kind == "text")
        return self._example(tokens, learn, pixels[:n_images], text)

    def _example(self, tokens, learn, pixels: list[np.ndarray], text: str) -> dict:
        size = self.image.size
        images = np.zeros((self.data.max_images, size, size, 3), np.float32)
        for k, x in enumerate(pixels):
            images[k] = x
        out = pad_example(tokens, learn, self.data.max_length, self.pad_id) | {"images": images}
        n = self.data.text_length
        if n > 0:
            ids = self._text_ids(text)[:n]
            out["text_tokens"] = np.full(n, self.text_pad_id, np.int32)
            out["text_tokens"][: len(ids)] = ids
            out["text_mask"] = (np.arange(n) < len(ids)).astype(np.int32)
        return out


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


def _image(value: Any) -> Any:
    # Sources mark images they already know are unusable as {"error": reason} (see interleaved.py).
    if isinstance(value, dict):
        raise BadExample(value.get("error", "bad_image"), value.get("detail", ""))
    return value


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


def _not_none(x: Any) -> bool:
    return x is not None


# source -> (data, synthetic_config) -> a map-style source of records
MAP_SOURCES = {
    "synthetic": lambda d, synthetic: SyntheticSource(
        synthetic or SyntheticConfig(), d.split, d.task, d.size, d.max_images
    ),
    "llava_json": lambda d, _: LlavaJsonSource(d.path, d.image_root),
    "mmc4": lambda d, _: Mmc4Source(d.path, d.image_root),
    "preference_json": lambda d, _: PreferenceJsonSource(d.path, d.image_root),
}


class HostRows(grain.MapDataset):
    """This host's rows ``[start, start + count)`` of every ``global_batch`` consecutive records: a
    host's share of the global stream, read without touching the other hosts' records."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, start: int, count: int):
        super().__init__(parent)
        self._global, self._start, self._count = global_batch, start, count

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._count)
        return self._parent[batch * self._global + self._start + row]

    def __str__(self) -> str:
        return f"HostRows(global_batch={self._global}, start={self._start}, count={self._count})"


def _examples(
    data: DataConfig,
    encoder: Encoder,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    synthetic_config: SyntheticConfig | None,
) -> grain.IterDataset:
    """One source's stream of encoded examples for this host, forever."""
    if data.source == "webdataset":
        stream = ShardStream(WebDatasetSource(data.path).shards, seed, data.shuffle)
        stream.split(process_index, process_count)
        ds: grain.IterDataset = stream
        if data.shuffle:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=SHUFFLE_WINDOW, seed=seed)
        return ds.map(encoder).filter(_not_none)
    records = grain.MapDataset.source(MAP_SOURCES[data.source](data, synthetic_config))
    if len(records) < process_count:
        raise ValueError(f"{len(records)} records in {data.path!r} for {process_count} processes")
    if data.shuffle:
        records = records.shuffle(seed=seed)
    # Every host orders the records alike (same seed) and reads only its rows of each global batch,
    # so N processes see exactly the batches one process would; repeat() reseeds the shuffle every
    # epoch. map returns None for bad examples, which to_iter_dataset drops (the index stays a plain
    # integer, so the state is still exact); the host then reads its next row instead.
    per_host = batch_size // process_count
    mapped = HostRows(records.repeat(), batch_size, process_index * per_host, per_host).map(encoder)
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(32, 2 * batch_size))
    return mapped.to_iter_dataset(read)


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
    text_tokenizer=None,
) -> grain.DatasetIterator:
    """Infinite iterator over batches for this host (see the module docstring for the batch layout).

    ``batch_size`` is the global batch, of which this host reads rows ``process_index * b`` to
    ``(process_index + 1) * b`` (``b = batch_size / process_count``) and returns batches of ``b``.
    Epochs repeat with a new shuffle order. With ``data.mix``, examples come
    from the components in proportion to their weights (a fixed interleaving, so the state is exact).
    ``skipped`` (if given) counts dropped examples by reason, in this process only
    (``num_workers == 0``), including prefetched ones. ``synthetic_config`` is the scene generator of
    ``source="synthetic"`` (default ``SyntheticConfig()``). ``text_tokenizer`` tokenizes the
    ``text_tokens`` of ``data.text_length > 0`` (default: ``tokenizer``). ``data.packing``: each row
    packs several examples (``packing.py``: segment ids, positions, the images of the row's examples in
    order). With ``num_workers > 0``, call
    ``close()`` on the iterator when done to stop the worker processes.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not divide over {process_count} processes")
    if skipped is not None and data.num_workers > 0:
        logging.warning("num_workers > 0: bad examples are dropped in the workers but not counted here")
    datasets, weights = [], []
    for i, (weight, component) in enumerate(data.components()):
        encoder = Encoder(component, tokenizer, image, model, skipped, text_tokenizer)
        component_seed = seed + i * MIX_SEED_STRIDE
        datasets.append(
            _examples(
                component, encoder, batch_size, component_seed, process_index, process_count, synthetic_config
            )
        )
        weights.append(weight)
    ds = datasets[0] if len(datasets) == 1 else grain.IterDataset.mix(datasets, weights)
    if data.packing:  # rows of several examples (packing.py); the packer's position is in the state
        spec = as_spec(model)
        slots = packing.row_images(data.max_length, data.max_images, data.packed_images, spec)
        ds = packing.PackIterDataset(ds, data.max_length, slots, _pad_id(tokenizer), spec)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    if data.num_workers > 0:
        # grain's workers read absl flags; outside an absl app (tests, notebooks) they are unparsed,
        # which grain treats as an error rather than "use the defaults".
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return iter(ds)
