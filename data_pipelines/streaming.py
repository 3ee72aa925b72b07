"""Streaming pretraining input: files -> this host's records -> tokens -> packed rows -> batches.

The corpus is never read whole. Sources are paths, directories or globs (comma-separated) of
`.jsonl` (one {"text": ...} per line), `.txt` (one document per file) and `.array_record`
(one UTF-8 document per record) files, local or any path etils/epath opens (gs://...), or a
prepared TFDS dataset ("tfds:NAME[@SPLIT]", text or token ids; data_pipelines/tfds_sources.py).

  corpus = Corpus.open("/data/c4/*.jsonl", eval_fraction=0.001)   # lists and stats files only
  stream = StreamingBatches(corpus, SentencePieceEncoder(path), bos, eos, StreamConfig(
      seq_len=4096, batch_size=64, process_index=jax.process_index(), process_count=...))

How the work is cut (chunks, held-out chunks and readers: data_pipelines/corpus.py):
  * Host p of P takes chunks p, p+P, ...; each epoch visits them in a new seeded order. Grain
    worker processes (`workers`) split a host's chunk stream again, each reading, tokenizing
    and packing its own; the host interleaves their rows.
  * Documents become BOS + ids + EOS, are concatenated and cut into rows of seq_len + 1 tokens
    (data_pipelines/text.py's packing), and rows are shuffled through a window of
    `shuffle_window` rows. Memory is that window plus one chunk's read buffer per worker.

The position is grain's iterator state (JSON-able): per worker, the chunk and the byte or
record where the next document starts, and the rows of the current shuffle window are re-read
from the window's start on restore, so a resumed run sees exactly the rows it would have seen.
Bad rows fail with file:line and reason; with `skip_bad_rows` they are counted in that state,
so the counts survive a resume too. The order depends on `workers` (not on the machine), so
keep it fixed across a run's restarts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import grain
import numpy as np

from data_pipelines import text
# Corpus, Shard and TFDS are re-exported: a stage needs only this module.
from data_pipelines.corpus import TFDS, ChunkAt, Corpus, Documents, Shard  # noqa: F401
from data_pipelines.text import DataError


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """How one host streams. `batch_size` is this host's rows per batch (its share of the
  global batch); `shuffle_window` is in rows (<= 1: no shuffling, the eval order)."""

  seq_len: int
  batch_size: int
  seed: int = 0
  shuffle_window: int = 1024
  workers: int = 0
  process_index: int = 0
  process_count: int = 1
  skip_bad_rows: bool = False
  text_field: str = "text"


class SentencePieceEncoder:
  """text -> ids with a SentencePiece model; picklable (the model loads in each worker)."""

  def __init__(self, path: str):
    self.path = path
    self._sp = None

  def __getstate__(self):
    return {"path": self.path, "_sp": None}

  def __call__(self, document: str) -> list[int]:
    if self._sp is None:
      import sentencepiece
      self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
    return self._sp.encode(document)


class ByteEncoder:
  """text -> one id per UTF-8 byte, folded into [first, vocab): a tokenizer-free encoder for
  tests and benchmarks (picklable, cheap to import in worker processes)."""

  def __init__(self, vocab: int, first: int = 3):
    self.vocab, self.first = vocab, first

  def __call__(self, document: str) -> np.ndarray:
    raw = np.frombuffer(document.encode(), np.uint8).astype(np.int32)
    return self.first + raw % (self.vocab - self.first)


class _Tokenize:
  """A document -> BOS + ids + EOS (int32); token records are taken as they are."""

  def __init__(self, encode: Callable[[str], Sequence[int]], bos: int, eos: int):
    self.encode, self.bos, self.eos = encode, bos, eos

  def __call__(self, document: dict) -> np.ndarray:
    ids = document["tokens"] if "tokens" in document else self.encode(document["text"])
    row = np.empty(len(ids) + 2, np.int32)
    row[0], row[1:-1], row[-1] = self.bos, ids, self.eos
    return row


class _Pack(grain.IterDataset):
  """Concatenated documents cut into rows of `length` tokens, as text.pack_documents does."""

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    self.length = length

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self.length)


class _PackIterator(grain.DatasetIterator):
  """State: the parent's state before the oldest buffered document, and how many of its tokens
  earlier rows took; restoring re-reads that document and drops them."""

  def __init__(self, parent: grain.DatasetIterator, length: int):
    super().__init__(parent)
    self.length = length
    self.pending: list[tuple[dict, np.ndarray]] = []  # (parent state before, tokens)
    self.used = 0  # tokens of pending[0] already in rows

  def __next__(self) -> np.ndarray:
    while sum(len(t) for _, t in self.pending) - self.used < self.length:
      before = self._parent.get_state()
      self.pending.append((before, next(self._parent)))
    parts, need = [], self.length
    while need:
      tokens = self.pending[0][1][self.used:self.used + need]
      parts.append(tokens)
      need -= len(tokens)
      self.used += len(tokens)
      if self.used == len(self.pending[0][1]):
        self.pending.pop(0)
        self.used = 0
    return np.concatenate(parts)

  def get_state(self) -> dict:
    if not self.pending:
      return {"parent": self._parent.get_state(), "used": 0}
    return {"parent": self.pending[0][0], "used": self.used}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.pending, self.used = [], 0
    if state["used"]:
      before = self._parent.get_state()
      self.pending.append((before, next(self._parent)))
      self.used = int(state["used"])


class _WindowShuffle(grain.IterDataset):
  """Rows shuffled within consecutive windows of `size`, as grain's WindowShuffleIterDataset,
  with a numpy permutation per window (grain's index_shuffle costs ~30 ms per window of any
  size up to ~1k, which small windows pay per handful of rows)."""

  def __init__(self, parent: grain.IterDataset, size: int, seed: int):
    super().__init__(parent)
    self.size, self.seed = size, seed

  def __iter__(self) -> _WindowShuffleIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self.size, self.seed)


class _WindowShuffleIterator(grain.DatasetIterator):
  """State: the parent's state at the window's start, the window's number and how many of its
  rows were given; restoring re-reads and re-shuffles the window."""

  def __init__(self, parent: grain.DatasetIterator, size: int, seed: int):
    super().__init__(parent)
    self.size, self.seed = size, seed
    self.window: list = []
    self.index, self.given = -1, 0
    self.start = self._parent.get_state()

  def _fill(self) -> None:
    self.start = self._parent.get_state()
    self.index += 1
    rows = []
    for _ in range(self.size):
      try:
        rows.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng([self.seed, self.index]).permutation(len(rows))
    self.window, self.given = [rows[i] for i in order], 0

  def __next__(self):
    if self.given == len(self.window):
      self._fill()
      if not self.window:
        raise StopIteration
    self.given += 1
    return self.window[self.given - 1]

  def get_state(self) -> dict:
    return {"window_start": self.start, "window": self.index, "given": self.given}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["window_start"])
    self.index, self.window, self.given = int(state["window"]) - 1, [], 0
    if self.index < -1:  # no window read yet
      self.index, self.start = -1, state["window_start"]
      return
    self._fill()
    self.given = int(state["given"])


def documents(corpus: Corpus, split: str, cfg: StreamConfig, epochs: int | None = None
              ) -> grain.IterDataset:
  """This host's documents of `split` ("train", "eval" or "all"): {"text"} or {"tokens"}, its
  chunks in a new seeded order each epoch (file order if cfg.shuffle_window <= 1); endless
  unless `epochs` is given."""
  ids = corpus.chunk_ids(split)
  host = slice(cfg.process_index, None, cfg.process_count)
  if len(ids[host]) < max(cfg.workers, 1):
    raise DataError(f"{split} chunks: {len(ids)} for {cfg.process_count} host(s) x "
                    f"{max(cfg.workers, 1)} worker(s); give more files or smaller chunks")
  chunks = grain.MapDataset.source(ids)[host]
  if cfg.shuffle_window > 1:
    chunks = chunks.shuffle(seed=cfg.seed)
  chunks = chunks.repeat(epochs).map(ChunkAt(corpus))
  return Documents(chunks, corpus, cfg.skip_bad_rows, cfg.text_field)


def rows(corpus: Corpus, split: str, encode, bos: int, eos: int, cfg: StreamConfig,
         epochs: int | None = None) -> grain.IterDataset:
  """Packed rows [seq_len + 1] (int32) of this host's documents of `split` (see `documents`),
  shuffled through a window unless cfg.shuffle_window <= 1; read, tokenized and packed in
  cfg.workers grain processes, each taking every workers-th chunk."""
  dataset = _Pack(documents(corpus, split, cfg, epochs).map(_Tokenize(encode, bos, eos)),
                  cfg.seq_len + 1)
  if cfg.shuffle_window > 1:
    window = max(2, cfg.shuffle_window // max(cfg.workers, 1))
    dataset = _WindowShuffle(dataset, window, cfg.seed)
  if cfg.workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults here)
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers),
                                  worker_init_fn=_exit_with_parent)
  return dataset


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Runs in each worker: exit when the training process is gone (a SIGKILLed trainer would
  otherwise leave its workers behind, blocked on a full queue)."""
  del worker_index, worker_count
  import threading
  import time
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)
  threading.Thread(target=watch, daemon=True).start()


class StreamingBatches(text.GrainBatches):
  """An endless, resumable stream of this host's batches (dicts of [B, T] numpy arrays, the
  schema of text.PackedBatches), with the bad rows dropped so far in `dropped`."""

  def __init__(self, corpus: Corpus, encode, bos: int, eos: int, cfg: StreamConfig,
               split: str = "train"):
    dataset = (rows(corpus, split, encode, bos, eos, cfg)
               .batch(cfg.batch_size, drop_remainder=True).map(text._to_batch))
    self._iterator = iter(dataset)

  @property
  def dropped(self) -> dict[str, int]:
    """Bad rows skipped so far, by kind, summed over workers (kept in the iterator state)."""
    return _dropped(self.get_state())[0]

  @property
  def first(self) -> dict[str, str]:
    """The first "file:line: reason" seen of each kind of skipped row."""
    return _dropped(self.get_state())[1]

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _dropped(state, counts=None, first=None) -> tuple[dict, dict]:
  """Sums every documents iterator's counts inside a (nested) grain state."""
  counts, first = ({} if counts is None else counts), ({} if first is None else first)
  if isinstance(state, dict):
    if "dropped" in state and "chunk" in state:
      for kind, n in state["dropped"].items():
        counts[kind] = counts.get(kind, 0) + n
      for kind, message in state["first"].items():
        first.setdefault(kind, message)
    for value in state.values():
      _dropped(value, counts, first)
  elif isinstance(state, (list, tuple)):
    for value in state:
      _dropped(value, counts, first)
  return counts, first


def fixed_batches(corpus: Corpus, split: str, encode, bos: int, eos: int, cfg: StreamConfig,
                  count: int) -> list[dict]:
  """The first `count` batches of this host's `split` chunks in file order (evaluation: the
  same every time); a small split is cycled to fill them, so every host gets `count`."""
  cfg = dataclasses.replace(cfg, shuffle_window=0, workers=0)
  stream = iter(rows(corpus, split, encode, bos, eos, cfg, epochs=None)
                .batch(cfg.batch_size, drop_remainder=True).map(text._to_batch))
  return [next(stream) for _ in range(count)]
