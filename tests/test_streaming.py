"""The streaming pretraining path: per-host shards, packing, exact resume, held-out chunks, and
bad input named by file:line (or counted) without losing the position."""

import json
import os

import numpy as np
import pytest

from data_pipelines import streaming, text
from data_pipelines.text import DataError

BOS, EOS = 1, 2


def ByteEncoder():  # noqa: N802
  return streaming.ByteEncoder(256)


def write_corpus(root, parts=4, lines=120, bad=None):
  """parts x lines JSONL documents "P.I words..."; `bad` = (part, line) gets a broken line."""
  root.mkdir(parents=True, exist_ok=True)
  docs = []
  for part in range(parts):
    with open(root / f"part{part}.jsonl", "w") as f:
      for i in range(1, lines + 1):
        if (part, i) == bad:
          f.write('{"text": "broken\n')
          continue
        doc = f"{part}.{i} " + "word " * (i % 23)
        docs.append(doc)
        f.write(json.dumps({"text": doc}) + "\n")
  return str(root), docs


def config(**overrides):
  return streaming.StreamConfig(**{"seq_len": 16, "batch_size": 4, "seed": 3,
                                   "shuffle_window": 8, **overrides})


def one_epoch(corpus, split="all", **overrides):
  return [d["text"] for d in streaming.documents(corpus, split, config(**overrides), epochs=1)]


def test_each_host_reads_its_own_shard_and_the_hosts_cover_the_corpus(tmp_path):
  source, docs = write_corpus(tmp_path / "c")
  (tmp_path / "c" / "notes.txt").write_text("A whole document in a text file.")
  corpus = streaming.Corpus.open(source)
  assert sum(s.chunks for s in corpus.shards) >= 8  # small corpora are cut finer, for sharding
  hosts = [one_epoch(corpus, process_index=p, process_count=2) for p in range(2)]
  assert not set(hosts[0]) & set(hosts[1]) and min(map(len, hosts)) > len(docs) // 4
  assert sorted(hosts[0] + hosts[1]) == sorted(docs + ["A whole document in a text file."])
  assert one_epoch(corpus, process_index=0, process_count=2) == hosts[0]  # deterministic
  assert one_epoch(corpus, process_index=0, process_count=2, seed=4) != hosts[0]


def test_unshuffled_rows_are_the_in_memory_packing_of_the_same_documents(tmp_path):
  source, docs = write_corpus(tmp_path / "c", parts=2)
  corpus = streaming.Corpus.open(source)
  encode = ByteEncoder()
  cfg = config(shuffle_window=0)
  streamed = np.stack(list(streaming.rows(corpus, "all", encode, BOS, EOS, cfg, epochs=1)))
  expected = text.pack_documents([encode(d) for d in docs], 16, BOS, EOS)
  np.testing.assert_array_equal(streamed, expected)


def take(stream, n):
  return [next(stream)["tokens"] for _ in range(n)]


def test_a_restored_stream_gives_exactly_the_rows_that_followed(tmp_path):
  corpus = streaming.Corpus.open(write_corpus(tmp_path / "c")[0])
  first = streaming.StreamingBatches(corpus, ByteEncoder(), BOS, EOS, config())
  take(first, 9)  # past the first shuffle windows, mid-window
  state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
  expected = take(first, 60)  # well into the second epoch
  second = streaming.StreamingBatches(corpus, ByteEncoder(), BOS, EOS, config())
  second.set_state(state)
  np.testing.assert_array_equal(np.stack(take(second, 60)), np.stack(expected))


def test_with_worker_processes_a_rewound_stream_repeats_its_rows(tmp_path):
  """Two grain workers read, tokenize and pack every other chunk; the host's state holds
  both workers' positions (starting workers costs seconds here, hence one iterator)."""
  corpus = streaming.Corpus.open(write_corpus(tmp_path / "c")[0])
  stream = streaming.StreamingBatches(corpus, ByteEncoder(), BOS, EOS, config(workers=2))
  try:
    take(stream, 9)
    state = json.loads(json.dumps(stream.get_state()))
    expected = take(stream, 40)
    stream.set_state(state)
    np.testing.assert_array_equal(np.stack(take(stream, 40)), np.stack(expected))
  finally:
    stream.close()


def test_held_out_chunks_are_never_trained_on(tmp_path):
  source, docs = write_corpus(tmp_path / "c")
  corpus = streaming.Corpus.open(source, eval_fraction=0.1)
  train, held = set(corpus.chunk_ids("train")), set(corpus.chunk_ids("eval"))
  assert held and not train & held and len(train | held) == sum(s.chunks for s in corpus.shards)
  train_docs = one_epoch(corpus, "train") + one_epoch(corpus, "train", process_index=1,
                                                       process_count=2)
  eval_docs = one_epoch(corpus, "eval")
  assert eval_docs and not set(eval_docs) & set(train_docs)
  # The eval batches are the same every time, and hold only held-out documents' tokens.
  batches = [streaming.fixed_batches(corpus, "eval", ByteEncoder(), BOS, EOS, config(), 3)
             for _ in range(2)]
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  held_tokens = {t for d in eval_docs for t in ByteEncoder()(d)}
  train_only = {t for d in train_docs for t in ByteEncoder()(d[:4])} - held_tokens
  assert not train_only & set(np.concatenate([b["tokens"].ravel() for b in batches[0]]))


def test_a_malformed_line_fails_with_file_and_line_and_keeps_the_position(tmp_path):
  source, _ = write_corpus(tmp_path / "c", bad=(2, 57))
  corpus = streaming.Corpus.open(source)
  stream = streaming.StreamingBatches(corpus, ByteEncoder(), BOS, EOS, config())
  states = []
  with pytest.raises(DataError, match=r"part2.jsonl:57: malformed JSON"):
    for _ in range(400):
      states.append(json.loads(json.dumps(stream.get_state())))
      next(stream)
  # The saved position is before the bad line: a restarted run meets it again, not past it.
  again = streaming.StreamingBatches(corpus, ByteEncoder(), BOS, EOS, config())
  again.set_state(states[-1])
  with pytest.raises(DataError, match=r"part2.jsonl:57"):
    next(again)


def test_skipped_bad_rows_are_counted_in_the_checkpointed_state(tmp_path):
  source, _ = write_corpus(tmp_path / "c", parts=3, lines=60, bad=(2, 57))
  corpus = streaming.Corpus.open(source)
  cfg = config(skip_bad_rows=True)
  stream = streaming.StreamingBatches(corpus, ByteEncoder(), BOS, EOS, cfg)
  take(stream, 3)
  state = json.loads(json.dumps(stream.get_state()))
  rows = take(stream, 250)  # about two epochs: the bad line is met twice
  dropped = stream.dropped
  assert dropped["malformed JSON"] >= 1 and set(dropped) == {"malformed JSON"}
  assert stream.first["malformed JSON"].startswith(f"{source}/part2.jsonl:57: malformed JSON (")
  resumed = streaming.StreamingBatches(corpus, ByteEncoder(), BOS, EOS, cfg)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(take(resumed, 250)), np.stack(rows))
  assert resumed.dropped == dropped


def test_an_unreadable_file_and_an_empty_glob(tmp_path):
  source, _ = write_corpus(tmp_path / "c", parts=2)
  with pytest.raises(DataError, match=r"nothing-\*.jsonl: matches no .jsonl, .txt or "
                                      r".array_record files"):
    streaming.Corpus.open(f"{source}/part0.jsonl,{source}/nothing-*.jsonl")
  corpus = streaming.Corpus.open(source)
  os.remove(f"{source}/part1.jsonl")  # gone between listing and reading (a lost mount, ...)
  with pytest.raises(DataError, match=r"part1.jsonl: cannot read \(No such file"):
    one_epoch(corpus)
  docs = one_epoch(corpus, skip_bad_rows=True)
  assert docs and all(d.startswith("0.") for d in docs)
  counted = streaming.documents(corpus, "all", config(skip_bad_rows=True), epochs=1)
  iterator = iter(counted)
  list(iterator)
  assert iterator.get_state()["dropped"] == {
      "unreadable file": sum(s.chunks for s in corpus.shards if s.path.endswith("part1.jsonl"))}


def test_array_record_files_stream_one_document_per_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
  for i in range(40):
    writer.write(f"record document {i}".encode())
  writer.write(b"  ")
  writer.close()
  corpus = streaming.Corpus.open(str(tmp_path))
  with pytest.raises(DataError, match=r"docs.array_record\[record 40\]: empty record"):
    one_epoch(corpus, shuffle_window=0)
  docs = one_epoch(corpus, shuffle_window=0, skip_bad_rows=True)
  assert docs == [f"record document {i}" for i in range(40)]
