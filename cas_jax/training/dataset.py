"""Self-study datasets on disk (ArrayRecord shards) and the grain pipeline that trains on them.

Layout of `data_dir` (shard i of n is written by process i, batch by batch):
  shard-00000-of-00002.json                       manifest, replaced atomically after each batch
  shard-00000-of-00002/batch-000000.array_record  one finalised file per synthesis batch
A batch file is written under a `.tmp` name and renamed once complete; the manifest lists only
finalised files, so a killed writer resumes at the first unlisted batch and readers never see a
partial file. Manifest fields: format_version, shard_index, shard_count, run (every setting
that decides the content), doc_ids (sorted vocabulary, the same in every shard), num_items,
num_batches, files [{name, num_records, bytes, lengths, dropped}] (dropped: conversations the
synthesis filter removed from that batch, per seed family).

Each record is one `Conversation` as uncompressed `.npz` bytes (no pickle). A missing or
resized file is reported when the dataset is opened; ArrayRecord (Riegeli) checksums every
chunk, so other corruption is reported on read. Both errors name the file.

Training batches (numpy), padded to `seq_len` (longer conversations keep their first seq_len
tokens, and the last position, whose target is cut off, is unmasked):
  tokens [B, T] int32 (padding 0)        loss_mask [B, T] bool (False on padding)
  teacher_ids [B, T, k] int32            teacher_logprobs [B, T, k] float32 (0 where not masked)
  doc_index [B] int32 (index in `doc_ids(data_dir)`)   conversation_index [B] int32
  length [B] int32 (valid tokens)
  route_scores [B, N] float32 (only with `make_train_iterator(route=)`: each row's retrieval
    scores against the N documents a routing geometry composes from, `training.routing`)
Positions are not included: the trainer gives valid token t position offset + t and padding -1.
The trainers cut each batch to its longest row rounded up to `length_bucket` tokens
(`trim_batch`): self-study conversations are mostly far shorter than `seq_len`, and the padding
columns cost as much compute as real tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import os
import re
import threading
from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from cas_jax import distributed

FORMAT_VERSION = 1
_MANIFEST = re.compile(r"shard-(\d{5})-of-(\d{5})\.json$")


class CorruptDatasetError(RuntimeError):
    """A dataset file is missing, truncated or fails its checksums; the message names it."""


@dataclasses.dataclass(frozen=True, eq=False)
class Conversation:
    """One self-study example (see `synthesis` for how it is made).

    tokens [T] int32: the student's view (chat template, no chunk).
    loss_mask [T] bool: True at t iff token t+1 is an assistant token (content or end of turn).
    teacher_ids [M, k] int32, teacher_logprobs [M, k] float32: the teacher's top-k for each
      True position of loss_mask, in order (M = loss_mask.sum()).
    chunk_start, chunk_end: the chunk's token span [start, end) in the document.
    messages: the conversation as JSON [{"role", "content"}, ...].
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    teacher_ids: np.ndarray
    teacher_logprobs: np.ndarray
    doc_id: str
    conversation_index: int
    chunk_start: int
    chunk_end: int
    seed_family: str
    messages: str

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **{f.name: np.asarray(getattr(self, f.name))
                         for f in dataclasses.fields(self)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Conversation:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            d = {f.name: z[f.name] for f in dataclasses.fields(cls)}
        for key in ("doc_id", "seed_family", "messages"):
            d[key] = str(d[key])
        for key in ("conversation_index", "chunk_start", "chunk_end"):
            d[key] = int(d[key])
        return cls(**d)


def shard_name(shard_index: int, shard_count: int) -> str:
    return f"shard-{shard_index:05d}-of-{shard_count:05d}"


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptDatasetError(f"{path}: unreadable shard manifest ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptDatasetError(f"{path}: format_version {manifest.get('format_version')}, "
                                  f"expected {FORMAT_VERSION}")
    return manifest


class ShardWriter:
    """Writes one shard batch by batch; reopening an existing shard resumes it."""

    def __init__(self, data_dir: str, shard_index: int, shard_count: int, *, run: dict,
                 doc_ids: Sequence[str], num_items: int, num_batches: int):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        self.data_dir = data_dir
        name = shard_name(shard_index, shard_count)
        self.manifest_path = os.path.join(data_dir, name + ".json")
        self.shard_dir = os.path.join(data_dir, name)
        os.makedirs(self.shard_dir, exist_ok=True)
        fresh = {"format_version": FORMAT_VERSION, "shard_index": shard_index,
                 "shard_count": shard_count, "run": json.loads(json.dumps(run)),
                 "doc_ids": sorted(doc_ids), "num_items": num_items,
                 "num_batches": num_batches, "files": []}
        if os.path.exists(self.manifest_path):
            self.manifest = _read_manifest(self.manifest_path)
            diff = sorted(k for k in fresh if k != "files" and self.manifest.get(k) != fresh[k])
            diff += sorted(f"run.{k}" for k in set(fresh["run"]) | set(self.manifest["run"])
                           if fresh["run"].get(k) != self.manifest["run"].get(k))
            if diff:
                raise ValueError(f"{self.manifest_path}: cannot resume, settings differ in "
                                 f"{diff}; use another output folder or the same settings")
        else:
            self.manifest = fresh
            _write_json_atomic(self.manifest_path, fresh)
        for stale in glob.glob(os.path.join(self.shard_dir, "*.tmp")):
            os.remove(stale)

    @property
    def batches_done(self) -> int:
        return len(self.manifest["files"])

    @property
    def conversations_done(self) -> int:
        return sum(f["num_records"] + sum(f.get("dropped", {}).values())
                   for f in self.manifest["files"])

    @property
    def complete(self) -> bool:
        return self.batches_done == self.manifest["num_batches"]

    def write_batch(self, batch_index: int, conversations: Sequence[Conversation],
                    dropped: dict[str, int] | None = None) -> None:
        """Finalises batch `batch_index` (must be the next one) and records it in the manifest.

        dropped: conversations of this batch the synthesis filter removed, per seed family
        (recorded, and counted as done)."""
        if batch_index != self.batches_done:
            raise ValueError(f"{self.manifest_path}: batch {batch_index} written out of order "
                             f"(next is {self.batches_done})")
        name = f"batch-{batch_index:06d}.array_record"
        path = os.path.join(self.shard_dir, name)
        writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
        for conv in conversations:
            writer.write(conv.to_bytes())
        writer.close()
        with open(path + ".tmp", "rb") as f:
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self.manifest["files"].append({
            "name": os.path.relpath(path, self.data_dir), "num_records": len(conversations),
            "bytes": os.path.getsize(path), "lengths": [len(c.tokens) for c in conversations],
            "dropped": dict(dropped or {})})
        _write_json_atomic(self.manifest_path, self.manifest)


def dropped_counts(data_dir: str) -> dict[str, int]:
    """Conversations the synthesis filter removed, per seed family, over all shards."""
    out: dict[str, int] = {}
    for m in read_manifests(data_dir):
        for f in m["files"]:
            for fam, n in f.get("dropped", {}).items():
                out[fam] = out.get(fam, 0) + n
    return out


def read_manifests(data_dir: str) -> list[dict]:
    """Every shard manifest in `data_dir`, in shard order, checked for consistency.

    Missing or unfinished shards are logged (their finalised batches are still used).
    """
    found = sorted(p for p in glob.glob(os.path.join(data_dir, "shard-*-of-*.json"))
                   if _MANIFEST.search(p))
    if not found:
        raise FileNotFoundError(f"{data_dir}: no shard manifests (shard-*-of-*.json); "
                                f"is this a synthesis output folder?")
    manifests = [_read_manifest(p) for p in found]
    first = manifests[0]
    for path, m in zip(found, manifests):
        for key in ("shard_count", "run", "doc_ids"):
            if m[key] != first[key]:
                raise CorruptDatasetError(f"{path}: {key} differs from {found[0]}; the folder "
                                          f"mixes shards of different synthesis runs")
    present = {m["shard_index"] for m in manifests}
    missing = sorted(set(range(first["shard_count"])) - present)
    unfinished = [m["shard_index"] for m in manifests if len(m["files"]) < m["num_batches"]]
    if missing or unfinished:
        logging.warning("%s: shards missing %s, unfinished %s; reading finalised batches only",
                        data_dir, missing, unfinished)
    return manifests


def doc_ids(data_dir: str) -> tuple[str, ...]:
    """The dataset's sorted doc id vocabulary: batch `doc_index` i means doc_ids[i]."""
    return tuple(read_manifests(data_dir)[0]["doc_ids"])


class ConversationSource:
    """Random access to every finalised conversation (grain `RandomAccessDataSource`).

    Record order: shard, then batch, then position in batch. Readers open lazily, per process.
    """

    def __init__(self, data_dir: str):
        manifests = read_manifests(data_dir)
        self.doc_ids = tuple(manifests[0]["doc_ids"])
        self.files: list[tuple[str, int]] = []
        self.lengths: list[int] = []
        for m in manifests:
            for f in m["files"]:
                path = os.path.join(data_dir, f["name"])
                if not os.path.isfile(path):
                    raise CorruptDatasetError(f"{path}: listed in the manifest but missing")
                if os.path.getsize(path) != f["bytes"]:
                    raise CorruptDatasetError(f"{path}: {os.path.getsize(path)} bytes, the "
                                              f"manifest says {f['bytes']} (truncated?)")
                self.files.append((path, f["num_records"]))
                self.lengths.extend(f["lengths"])
        self._starts = np.cumsum([0] + [n for _, n in self.files])
        self._readers: dict[int, ArrayRecordReader] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> Conversation:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        path, num_records = self.files[f]
        local = index - int(self._starts[f])
        try:
            with self._lock:
                reader = self._readers.get(f)
                if reader is None:
                    reader = ArrayRecordReader(path, "readahead_buffer_size:0")
                    if not reader.ok() or reader.num_records() != num_records:
                        raise CorruptDatasetError(
                            f"{path}: holds {reader.num_records()} readable records, the "
                            f"manifest says {num_records}")
                    self._readers[f] = reader
                data = reader.read([local])[0]
            return Conversation.from_bytes(data)
        except CorruptDatasetError:
            raise
        except Exception as e:  # Riegeli checksum, EOF or npz errors
            raise CorruptDatasetError(f"{path}: record {local} is corrupted: {e}") from e


def pad_example(conv: Conversation, *, seq_len: int, doc_index: dict[str, int],
                route: Callable[[Conversation], np.ndarray] | None = None) -> dict:
    """One training row of the batch format (module doc), truncated/padded to seq_len; with
    `route`, also its route_scores.

    A truncated row keeps its first seq_len tokens; its last position is unmasked, since the
    token it predicts is cut off (so loss_mask[t] always implies token t+1 is in the row).
    """
    n = min(len(conv.tokens), seq_len)
    k = conv.teacher_ids.shape[1]
    tokens = np.zeros(seq_len, np.int32)
    tokens[:n] = conv.tokens[:n]
    loss_mask = np.zeros(seq_len, bool)
    loss_mask[:n] = conv.loss_mask[:n]
    loss_mask[n - 1] &= n == len(conv.tokens)  # a truncated row's last target is cut off
    where = np.flatnonzero(loss_mask)  # the first len(where) teacher rows, in order
    teacher_ids = np.zeros((seq_len, k), np.int32)
    teacher_ids[where] = conv.teacher_ids[:len(where)]
    teacher_logprobs = np.zeros((seq_len, k), np.float32)
    teacher_logprobs[where] = conv.teacher_logprobs[:len(where)]
    row = {"tokens": tokens, "loss_mask": loss_mask, "teacher_ids": teacher_ids,
           "teacher_logprobs": teacher_logprobs,
           "doc_index": np.int32(doc_index[conv.doc_id]),
           "conversation_index": np.int32(conv.conversation_index), "length": np.int32(n)}
    if route is not None:
        row["route_scores"] = np.asarray(route(conv), np.float32)
    return row


SEQUENCE_FIELDS = ("tokens", "loss_mask", "teacher_ids", "teacher_logprobs")
LENGTH_BUCKET = 64  # the trainers' default `length_bucket`


def trim_batch(batch: dict, length_bucket: int) -> dict:
    """`batch` without its padding columns past the longest row, rounded up to a multiple of
    `length_bucket` (0: unchanged). The longest row is taken over every process's rows, so all
    processes cut to one width; the few distinct widths bound recompilation. Only padding is
    removed (masked, position -1), so the loss is the same."""
    if length_bucket <= 0:
        return batch
    width = batch["tokens"].shape[1]
    longest = int(distributed.allgather_rows(np.asarray(batch["length"])).max())
    cut = min(width, -(-max(longest, 1) // length_bucket) * length_bucket)
    if cut == width:
        return batch
    return {k: (v[:, :cut] if k in SEQUENCE_FIELDS else v) for k, v in batch.items()}


class _ProcessRows(grain.MapDataset):
    """The `rows` (a slice, `distributed.local_rows`) of every global batch of `batch` records
    of `parent`; a partial last batch is dropped."""

    def __init__(self, parent: grain.MapDataset, batch: int, rows: slice):
        super().__init__(parent)
        self._batch, self._start = batch, rows.start
        self._per = rows.stop - rows.start
        self._length = len(parent) // batch * self._per

    def __len__(self) -> int:
        return self._length

    def _global(self, j: int) -> int:
        step, row = divmod(int(j), self._per)
        return step * self._batch + self._start + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return grain.MapDataset.slice(self, index)
        return self._parent[self._global(index)]

    def __str__(self) -> str:
        return f"_ProcessRows(batch={self._batch}, rows={self._start}:{self._start + self._per})"


def make_train_iterator(data_dir: str, batch_size: int, seq_len: int, seed: int = 0, *,
                        shuffle: bool = True, num_epochs: int | None = 1,
                        shard_index: int | None = None, shard_count: int | None = None,
                        drop_remainder: bool = False, num_threads: int = 4,
                        route: Callable[[Conversation], np.ndarray] | None = None
                        ) -> grain.DatasetIterator:
    """A checkpointable iterator over this process's rows of every global training batch.

    The global stream is every record, each epoch shuffled with a seed folded with the epoch
    (num_epochs None repeats forever), cut into global batches of `batch_size`. Process
    `shard_index` of `shard_count` (default: jax.process_index() of jax.process_count()) gets
    the contiguous block of batch_size / shard_count rows of each global batch that its devices
    hold on the global mesh, and reads only those records: stacked in process order, the
    processes' batches are the single-process batch. With several processes batch_size must
    divide evenly and a partial last global batch is dropped. The iterator has
    get_state()/set_state() for checkpoints; its state is the same on every process.
    Logs how many conversations are truncated to seq_len. route: each row's route_scores
    (module doc), computed in the pipeline's threads.
    """
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    rows = distributed.local_rows(batch_size, shard_index, shard_count)
    source = ConversationSource(data_dir)
    if len(source) == 0:
        raise ValueError(f"{data_dir}: the dataset holds no conversations")
    long = int((np.asarray(source.lengths, np.int64) > seq_len).sum())
    if long:
        logging.warning("%s: %d of %d conversations are longer than seq_len=%d and truncated",
                        data_dir, long, len(source), seq_len)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs)
    per = rows.stop - rows.start
    if shard_count > 1:
        ds = _ProcessRows(ds, batch_size, rows)
        if len(ds) == 0:
            raise ValueError(f"{data_dir}: {len(source)} conversations make no global batch "
                             f"of {batch_size}")
    ds = ds.map(functools.partial(
        pad_example, seq_len=seq_len, doc_index={d: i for i, d in enumerate(source.doc_ids)},
        route=route))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=2 * per))
    return iter(ds.batch(per, drop_remainder=drop_remainder))
