"""A corpus as chunks, and the documents of a stream of chunks (for data_pipelines/streaming.py).

Files are cut into chunks: byte ranges of `chunk_bytes` for JSONL (a line belongs to the chunk
holding its first byte, so no index of lines is ever built), record ranges for array_record and
TFDS, one chunk per .txt file. The chunk table is arithmetic over the file sizes, so opening a
corpus costs one stat per file, whatever its size. A deterministic fraction of the chunks (by a
hash of file and chunk number) can be held out for evaluation.

`Documents` reads a (sliceable) stream of chunks: its position is the chunk and the byte or
record where the next document starts, plus the bad rows it skipped, counted by kind, so both
survive a checkpoint. Bad rows fail with file:line and reason; the line is counted from the
file's start only when an error needs it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import zlib
from typing import Callable, Iterator

import grain
import numpy as np

from data_pipelines.text import DataError

SUFFIXES = (".jsonl", ".txt", ".array_record")
TFDS = "tfds:"


@dataclasses.dataclass(frozen=True)
class Shard:
  """One file or one TFDS split: `size` in its chunking unit (bytes, records, or 1 for .txt)."""

  path: str
  kind: str  # "jsonl" | "txt" | "array_record" | "tfds"
  size: int
  chunk: int  # units per chunk
  data_dir: str = ""

  @property
  def chunks(self) -> int:
    """How many chunks the shard is cut into (the last may be short)."""
    return -(-self.size // self.chunk) if self.size else 0


def _is_remote(path: str) -> bool:
  return "://" in path


def _expand(pattern: str) -> list[str]:
  if _is_remote(pattern):
    from etils import epath  # only for remote paths: gs://, s3://, ...
    path = epath.Path(pattern)
    if path.is_dir():
      return [os.fspath(p) for p in path.rglob("*") if p.is_file()]
    if any(c in pattern for c in "*?["):
      root = pattern[:min(pattern.index(c) for c in "*?[" if c in pattern)].rsplit("/", 1)[0]
      return [os.fspath(p) for p in epath.Path(root).glob(pattern[len(root) + 1:])]
    return [pattern] if path.exists() else []
  if os.path.isdir(pattern):
    return [os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names]
  return glob.glob(pattern)


def _size(path: str) -> int:
  try:
    if _is_remote(path):
      from etils import epath
      return epath.Path(path).stat().length
    return os.stat(path).st_size
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def _num_records(path: str) -> int:
  from array_record.python import array_record_module  # only for array_record sources
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except Exception as e:  # noqa: BLE001  (the reader raises plain RuntimeErrors)
    raise DataError(f"{path}: cannot read as array_record ({e})") from e
  try:
    return reader.num_records()
  finally:
    reader.close()


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The shards of a source and which of their chunks are training or held-out chunks."""

  shards: tuple[Shard, ...]
  eval_fraction: float = 0.0

  @classmethod
  def open(cls, source: str, *, chunk_bytes: int = 8 << 20, min_chunks: int = 64,
           eval_fraction: float = 0.0, data_dir: str = "", records_per_chunk: int = 4096,
           split: str = "train") -> Corpus:
    """Lists and sizes the files of `source` (comma-separated paths, directories, globs, or
    one "tfds:NAME[@SPLIT]", SPLIT defaulting to `split`). A small corpus gets smaller
    chunks, at least `min_chunks` of them where its lines allow (4 KB at the least), so hosts,
    workers and a held-out fraction all get some."""
    if source.startswith(TFDS):
      from data_pipelines import tfds_sources
      name, split = tfds_sources.parse_source(source, split)
      size = len(tfds_sources.data_source(name, split, data_dir or None))
      shard = Shard(f"{name}@{split}", "tfds", size,
                    max(1, min(records_per_chunk, size // min_chunks)), data_dir)
      return cls((shard,), eval_fraction)
    files = []
    for pattern in filter(None, (p.strip() for p in source.split(","))):
      found = sorted(f for f in _expand(pattern) if f.endswith(SUFFIXES))
      if not found:
        raise DataError(f"{pattern}: matches no .jsonl, .txt or .array_record files")
      files += found
    if not files:
      raise DataError(f"{source!r}: no files given")
    sizes = [(f, _num_records(f) if f.endswith(".array_record") else _size(f)) for f in files]
    text_bytes = sum(s for f, s in sizes if f.endswith(".jsonl"))
    records = sum(s for f, s in sizes if f.endswith(".array_record"))
    jsonl_chunk = max(4096, min(chunk_bytes, text_bytes // min_chunks))
    record_chunk = max(1, min(records_per_chunk, records // min_chunks))
    shards = []
    for path, size in sizes:
      kind = path.rsplit(".", 1)[1]
      unit = {"jsonl": jsonl_chunk, "array_record": record_chunk, "txt": 1}[kind]
      shards.append(Shard(path, kind, 1 if kind == "txt" else size, unit))
    return cls(tuple(shards), eval_fraction)

  def chunk_ids(self, split: str) -> np.ndarray:
    """Global chunk numbers of "train" or "eval" ("all": every chunk, for an eval file set).
    Held out: chunks whose hash of (file, chunk number) falls under eval_fraction; at least
    one when the fraction is positive."""
    counts = np.array([s.chunks for s in self.shards], np.int64)
    ids = np.arange(counts.sum(), dtype=np.int64)
    if split == "all" or self.eval_fraction <= 0:
      if split == "eval" and self.eval_fraction <= 0:
        raise ValueError("no eval split: give an eval file set or a positive eval_fraction")
      return ids
    # By file name, not path: the same files copied elsewhere (gs:// or local) split the same.
    scores = np.fromiter((zlib.crc32(f"{os.path.basename(s.path)}#{k}".encode()) / 2**32
                          for s in self.shards for k in range(s.chunks)), np.float64, len(ids))
    held = scores < self.eval_fraction
    if not held.any():
      held[np.argmin(scores)] = True
    if held.all():
      raise DataError(f"eval_fraction={self.eval_fraction} leaves no training chunks")
    return ids[held] if split == "eval" else ids[~held]


class ChunkAt:
  """Global chunk number -> (shard index, start, stop) in the shard's unit; a picklable table."""

  def __init__(self, corpus: Corpus):
    self.starts = np.cumsum([0] + [s.chunks for s in corpus.shards])

  def __call__(self, chunk: int) -> tuple[int, int]:
    shard = int(np.searchsorted(self.starts, chunk, side="right")) - 1
    return shard, int(chunk - self.starts[shard])


class Documents(grain.IterDataset):
  """Documents of a stream of chunks ({"where", "text"} or {"where", "tokens"}); sliceable, so
  grain's worker processes each take every W-th chunk."""

  def __init__(self, chunks: grain.MapDataset, corpus: Corpus, bad_skip: bool, field: str):
    super().__init__(chunks)
    self.corpus, self.skip, self.field = corpus, bad_skip, field

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # chunks are interleaved either way
    self._parents = (self._parents[0].slice(sl),)

  def __iter__(self) -> DocumentsIterator:
    return DocumentsIterator(self._parents[0], self.corpus, self.skip, self.field)


class DocumentsIterator(grain.DatasetIterator):
  """The documents of `chunks` in order, one str each; its state (chunk, byte or record offset,
  skip counts) resumes exactly."""

  def __init__(self, chunks, corpus: Corpus, skip: bool, field: str):
    super().__init__()
    self.chunks, self.shards, self.skip, self.field = chunks, corpus.shards, skip, field
    self.chunk, self.offset = 0, -1  # -1: at the chunk's start, not yet at a line boundary
    self.dropped: dict[str, int] = {}
    self.first: dict[str, str] = {}
    self._reader: Iterator | None = None
    self._empty_chunks = 0

  def get_state(self) -> dict:
    return {"chunk": self.chunk, "offset": self.offset, "dropped": dict(self.dropped),
            "first": dict(self.first)}

  def set_state(self, state: dict) -> None:
    self.chunk, self.offset = int(state["chunk"]), int(state["offset"])
    self.dropped, self.first = dict(state["dropped"]), dict(state["first"])
    self._close()

  def _close(self):
    if self._reader is not None:
      self._reader.close()
    self._reader = None

  def bad(self, path: str, where: Callable[[], str], kind: str, reason: str) -> None:
    """Fails with file:line and reason, or counts; `where` is only computed when needed."""
    if not self.skip:
      raise DataError(f"{where()}: {reason} (set skip_bad_rows to drop such rows and count "
                      "them)")
    self.dropped[kind] = self.dropped.get(kind, 0) + 1
    if kind not in self.first:
      self.first[kind] = f"{where()}: {reason}"

  def __next__(self) -> dict:
    while True:
      if self._reader is None:
        if self.chunk >= len(self.chunks):
          raise StopIteration  # a finite number of epochs ran out
        shard_index, chunk_in_shard = self.chunks[self.chunk]
        shard = self.shards[shard_index]
        start = chunk_in_shard * shard.chunk
        stop = min(start + shard.chunk, shard.size)
        self._reader = _READERS[shard.kind](self, shard, start, stop)
      for offset, document in self._reader:
        self.offset = offset
        if document is not None:
          self._empty_chunks = 0
          return document
      self._close()
      self.chunk, self.offset = self.chunk + 1, -1
      self._empty_chunks += 1
      if self._empty_chunks > 2 * sum(s.chunks for s in self.shards) + 1:
        raise DataError("no documents in this host's share of the corpus: every chunk it reads "
                        f"is empty or bad ({self.dropped or 'none dropped'})")


def _line_number(path: str, position: int) -> int:
  """1-based line of the byte at `position`: counted only when an error needs it."""
  count, done = 0, 0
  with _open(path) as f:
    while done < position:
      block = f.read(min(1 << 20, position - done))
      if not block:
        break
      count, done = count + block.count(b"\n"), done + len(block)
  return count + 1


def _open(path: str):
  if _is_remote(path):
    from etils import epath
    return epath.Path(path).open("rb")
  return open(path, "rb")


def _read_jsonl(it: DocumentsIterator, shard: Shard, start: int, stop: int):
  """(offset after the line, document or None) for every line starting in [start, stop)."""
  try:
    f = _open(shard.path)
  except OSError as e:
    it.bad(shard.path, lambda: shard.path, "unreadable file", f"cannot read ({e.strerror or e})")
    return
  with f:
    position = it.offset
    if position < 0:  # align to the first line that starts in this chunk
      position = start
      if start > 0:
        f.seek(start - 1)
        position = start - 1 + len(f.readline())
    f.seek(position)
    while position < stop:
      line = f.readline()
      if not line:
        return
      at, position = position, position + len(line)
      if not line.strip():
        yield position, None
        continue
      where = lambda at=at: f"{shard.path}:{_line_number(shard.path, at)}"  # noqa: E731
      yield position, _parse(it, shard.path, where, line)


def _parse(it: DocumentsIterator, path: str, where, line: bytes) -> dict | None:
  try:
    row = json.loads(line)
  except UnicodeDecodeError as e:
    return it.bad(path, where, "invalid UTF-8", f"invalid UTF-8 at byte {e.start}")
  except json.JSONDecodeError as e:
    return it.bad(path, where, "malformed JSON", f"malformed JSON ({e.msg})")
  if not isinstance(row, dict) or not isinstance(row.get(it.field), str):
    return it.bad(path, where, "missing field", f"needs a string field {it.field!r}")
  if not row[it.field].strip():
    return it.bad(path, where, "empty text", f"empty {it.field!r}")
  return {"text": row[it.field]}


def _read_txt(it: DocumentsIterator, shard: Shard, start: int, stop: int):
  del start, stop
  if it.offset >= 1:
    return
  try:
    with _open(shard.path) as f:
      raw = f.read()
  except OSError as e:
    it.bad(shard.path, lambda: shard.path, "unreadable file", f"cannot read ({e.strerror or e})")
    return
  try:
    document = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    yield 1, it.bad(shard.path, lambda: shard.path, "invalid UTF-8",
                    f"invalid UTF-8 at byte {e.start}")
    return
  if not document.strip():
    yield 1, it.bad(shard.path, lambda: shard.path, "empty text", "empty file")
    return
  yield 1, {"text": document}


def _records(it: DocumentsIterator, shard: Shard, start: int, stop: int, fetch):
  """(next record index, record) for records [start or the saved offset, stop), in blocks."""
  position = start if it.offset < 0 else it.offset
  while position < stop:
    block = list(range(position, min(position + 256, stop)))
    for index, record in zip(block, fetch(block)):
      yield index + 1, index, record
    position = block[-1] + 1


def _read_array_record(it: DocumentsIterator, shard: Shard, start: int, stop: int):
  try:
    source = grain.sources.ArrayRecordDataSource([shard.path])
  except Exception as e:  # noqa: BLE001
    it.bad(shard.path, lambda: shard.path, "unreadable file", f"cannot read ({e})")
    return
  for offset, index, raw in _records(it, shard, start, stop, source.__getitems__):
    where = lambda index=index: f"{shard.path}[record {index}]"  # noqa: E731
    try:
      document = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      yield offset, it.bad(shard.path, where, "invalid UTF-8", f"invalid UTF-8 at byte {e.start}")
      continue
    if not document.strip():
      yield offset, it.bad(shard.path, where, "empty text", "empty record")
      continue
    yield offset, {"text": document}


def _read_tfds(it: DocumentsIterator, shard: Shard, start: int, stop: int):
  from data_pipelines import tfds_sources
  name, split = shard.path.split("@", 1)
  source = tfds_sources.data_source(name, split, shard.data_dir or None)
  for offset, index, raw in _records(it, shard, start, stop, source.__getitems__):
    record = tfds_sources.decode(raw)
    where = lambda index=index, record=record: (  # noqa: E731
        record.get("where") or f"tfds:{name}/{split}[{index}]")
    if "tokens" in record:
      tokens = np.asarray(record["tokens"], np.int32)
      yield offset, ({"tokens": tokens} if len(tokens) else
                     it.bad(shard.path, where, "empty text", "no tokens"))
      continue
    value = record.get(it.field)
    if not isinstance(value, str):
      yield offset, it.bad(shard.path, where, "missing field", f"needs a string field "
                           f"{it.field!r}")
    elif not value.strip():
      yield offset, it.bad(shard.path, where, "empty text", f"empty {it.field!r}")
    else:
      yield offset, {"text": value}


_READERS = {"jsonl": _read_jsonl, "txt": _read_txt, "array_record": _read_array_record,
            "tfds": _read_tfds}
