"""Plain-text pretraining data: read documents, tokenize, concatenate with EOS, pack, batch.

Documents come from `.jsonl` files (one `{"text": ...}` per line) or `.txt` files (one document
per file), or directories of them. Packing follows the usual pretraining recipe: every document
becomes BOS + pieces + EOS, all are concatenated, and the stream is cut into rows of seq_len + 1
tokens (inputs and next-token targets); the last partial row is dropped and reported.

Batches are dicts of numpy arrays [B, T]: tokens, targets, loss_mask (1 everywhere),
segment_ids (1 everywhere: pretraining attends across document boundaries, as the reference
code does), positions (0..T-1). The iterator is a grain pipeline: deterministic for a seed, and
its position is saved and restored exactly with get_state / set_state.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Iterator, Sequence

import grain
import numpy as np


class DataError(ValueError):
  """Bad input, with the file, line and reason."""


class BadRows:
  """What a reader does with a bad row: fail naming file, line and reason (the default), or,
  with `skip=True`, drop it and count it by kind (`dropped`: kind -> count; `first`: kind -> the
  first "file:line: reason" of that kind). Every reader and packer takes one, so one option
  covers text, dialogues, preference pairs and prompts, and nothing is dropped uncounted.

  Kinds: "malformed JSON", "invalid UTF-8", "missing field", "empty text", "roles out of
  order", "unknown role", "control tag", "longer than seq_len", and the pair and prompt checks
  of data_pipelines/preferences.py.
  """

  def __init__(self, skip: bool = False):
    self.skip = skip
    self.dropped: dict[str, int] = {}
    self.first: dict[str, str] = {}

  def __call__(self, where: str, kind: str, reason: str) -> None:
    """Records a bad row; raises DataError unless skipping. Callers `continue` after it."""
    message = f"{where}: {reason}"
    if not self.skip:
      raise DataError(message + " (set skip_bad_rows to drop such rows and count them)")
    self.dropped[kind] = self.dropped.get(kind, 0) + 1
    self.first.setdefault(kind, message)

  @property
  def total(self) -> int:
    return sum(self.dropped.values())

  def summary(self) -> str:
    """One line: how many rows were dropped, by kind."""
    if not self.dropped:
      return "no rows dropped"
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.dropped.items()))
    return f"dropped {self.total} rows: {kinds}"


@dataclasses.dataclass(frozen=True)
class PackingConfig:
  seq_len: int
  batch_size: int
  seed: int = 0
  rows: tuple[int, int] | None = None  # this process's share of each global batch


def document_files(source: str) -> list[str]:
  """The .jsonl / .txt files of a path, a directory, or a glob, sorted."""
  if os.path.isdir(source):
    files = [os.path.join(root, name) for root, _, names in os.walk(source) for name in names]
  else:
    files = glob.glob(source)
  files = sorted(f for f in files if f.endswith((".jsonl", ".txt")))
  if not files:
    raise DataError(f"{source}: no .jsonl or .txt files")
  return files


def read_documents(source: str, bad: BadRows | None = None) -> list[str]:
  """Every document under `source`; a bad one goes to `bad` (default: fail with file:line:why).

  A .txt file is one document; an empty .txt file is a bad row like an empty JSONL 'text'.
  """
  bad = bad if bad is not None else BadRows()
  return [row for _, row in text_rows(source, bad)]


def text_rows(source: str, bad: BadRows) -> Iterator[tuple[str, str]]:
  """("file:line" or "file", document) for every good document under `source`."""
  for path in document_files(source):
    with open(path, "rb") as f:
      raw = f.read()
    if path.endswith(".txt"):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad(path, "invalid UTF-8", f"invalid UTF-8 at byte {e.start}")
        continue
      if not text.strip():
        bad(path, "empty text", "empty file")
        continue
      yield path, text
      continue
    for where, row in jsonl_rows(path, raw, bad):
      if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        bad(where, "missing field", "needs a string field 'text'")
      elif not row["text"].strip():
        bad(where, "empty text", "empty 'text'")
      else:
        yield where, row["text"]


def jsonl_rows(path: str, raw: bytes | None = None, bad: BadRows | None = None
               ) -> Iterator[tuple[str, object]]:
  """("file:line", parsed JSON) for every non-blank line; bad UTF-8 or JSON goes to `bad`."""
  bad = bad if bad is not None else BadRows()
  if raw is None:
    with open(path, "rb") as f:
      raw = f.read()
  for number, line in enumerate(raw.split(b"\n"), start=1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
      bad(where, "invalid UTF-8", f"invalid UTF-8 at byte {e.start}")
      continue
    try:
      row = json.loads(decoded)
    except json.JSONDecodeError as e:
      bad(where, "malformed JSON", f"malformed JSON ({e.msg})")
      continue
    yield where, row


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, bos: int, eos: int
                   ) -> np.ndarray:
  """BOS + doc + EOS for each, concatenated, cut into rows [N, seq_len + 1] (int32)."""
  stream = np.fromiter((t for doc in documents for t in (bos, *doc, eos)), np.int32)
  rows = len(stream) // (seq_len + 1)
  if rows == 0:
    raise DataError(f"{len(stream)} tokens do not fill one row of {seq_len + 1}")
  return stream[:rows * (seq_len + 1)].reshape(rows, seq_len + 1)


def _to_batch(rows) -> dict[str, np.ndarray]:
  """Packed rows -> a batch: [B, T + 1] token rows, or a dict of already-split [B, T] arrays."""
  if isinstance(rows, dict):
    return rows
  shape = (rows.shape[0], rows.shape[1] - 1)
  return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
          "loss_mask": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}


def _take(rows, index):
  return {k: v[index] for k, v in rows.items()} if isinstance(rows, dict) else rows[index]


def _count(rows) -> int:
  return len(next(iter(rows.values()))) if isinstance(rows, dict) else len(rows)


class GrainBatches:
  """Batches from a grain iterator (`self._iterator`), its position saved with checkpoints."""

  _iterator: Iterator

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)


class PackedBatches(GrainBatches):
  """An endless, shuffled, resumable stream of batches over packed rows.

  `rows` is [N, T + 1] token rows (pretraining) or a dict of [N, T] arrays (packed chat data).
  """

  def __init__(self, rows, cfg: PackingConfig):
    start, stop = cfg.rows or (0, cfg.batch_size)
    if _count(rows) < cfg.batch_size:
      raise DataError(f"{_count(rows)} packed rows cannot fill a batch of {cfg.batch_size}")
    # One seeded permutation of the rows, repeated: each epoch visits every row once.
    dataset = (grain.MapDataset.range(_count(rows)).shuffle(seed=cfg.seed).repeat()
               .batch(cfg.batch_size, drop_remainder=True)
               .map(lambda index: _to_batch(_take(rows, np.asarray(index)[start:stop]))))
    self._iterator = iter(dataset.to_iter_dataset())
    self.dropped: dict[str, int] = {}  # bad rows the reader skipped, by kind (BadRows.dropped)


def fixed_batches(rows, batch_size: int, count: int,
                  process_rows: tuple[int, int] | None = None) -> list[dict]:
  """The first `count` batches of rows in order (for evaluation: the same every time).

  Masked rows (dicts with a loss_mask) fewer than one batch are padded with empty rows, which
  carry no loss, so a small evaluation set still makes one batch.
  """
  start, stop = process_rows or (0, batch_size)
  if isinstance(rows, dict) and "loss_mask" in rows and 0 < _count(rows) < batch_size:
    missing = batch_size - _count(rows)
    rows = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
            for k, v in rows.items()}
  count = min(count, _count(rows) // batch_size)
  if count == 0:
    raise DataError(f"{_count(rows)} packed rows cannot fill one batch of {batch_size}")
  return [_to_batch(_take(rows, np.arange(i * batch_size, (i + 1) * batch_size)[start:stop]))
          for i in range(count)]


def tokenize_all(documents: Sequence[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
  return [encode(doc) for doc in documents]
