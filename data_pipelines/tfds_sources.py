"""TFDS datasets in array_record: build them from our files, read any of them back through grain.

  build("text", {"train": "corpus/", "eval": "held_out.jsonl"}, data_dir, "my_corpus")
  documents("my_corpus", "train", data_dir)        # -> [str], ready for text.pack_documents

Five kinds, each validated by the same reader a JSONL file goes through (so a bad row fails with
file:line:reason or, with a skipping `text.BadRows`, is dropped and counted before anything is
written), and each record keeps `where`, the "file:line" it came from, so later errors (an
example too long for seq_len) still name the source line:

  text         .txt files / {"text"} JSONL        -> {"where", "text"}
  tokens       the same, tokenized                -> {"where", "tokens": int32 [n]} (no BOS/EOS)
  dialogues    {"messages": [...]} JSONL          -> {"where", "messages": {"role", "content"}}
  preferences  pairs, ours or HH-RLHF (preferences.py) -> {"where", "messages", "chosen",
               "rejected", "rating", "chosen_safe", "rejected_safe", "is_safety"}
  prompts      prompts (preferences.py)           -> {"where", "messages", "is_safety",
               "category", "answer"}

Why this path works without TensorFlow: a `tfds.core.GeneratorBasedBuilder` prepared with
`file_format="array_record"` writes through array_record's own writer (TensorFlow is only needed
for the tfrecord format and for `as_dataset`), and `as_data_source` / `tfds.data_source` read
records with array_record's random-access reader, which grain takes as a `MapDataset` source.
Builders are made per dataset name and not added to the TFDS registry, so a name is just the
directory under data_dir; `records` then loads a dataset by name from data_dir the same way it
loads a TFDS catalog dataset a user has prepared there. Examples keep their file order
(`disable_shuffling`), so a build is deterministic and `where` stays meaningful.

`build(..., beam_runner="DirectRunner")` makes the examples in an Apache Beam pipeline run by
TFDS (one file per element, tokenized in the workers) instead of a loop in this process: the
same records, for a corpus that needs more than one process, or a cluster, to tokenize.
"""

from __future__ import annotations

import functools
import glob
import os
from typing import Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import chat, preferences, text

KINDS = ("text", "tokens", "dialogues", "preferences", "prompts")
PREFIX = "tfds:"  # a stage's data.source "tfds:NAME[@SPLIT]" names a prepared dataset
_BAD_ROWS = "data_pipelines.tfds_sources.bad_rows"  # Beam metrics namespace, ":SPLIT" added


def parse_source(source: str, default_split: str) -> tuple[str, str]:
  """"tfds:NAME[@SPLIT]" -> (NAME, SPLIT); NAME may carry a config and version
  ("wiki/en:1.0.0"), SPLIT any TFDS split spec ("train[:90%]")."""
  if not source.startswith(PREFIX):
    raise ValueError(f"{source!r} is not a TFDS source (tfds:NAME[@SPLIT])")
  name, _, split = source[len(PREFIX):].partition("@")
  return name, split or default_split


def _features(kind: str) -> tfds.features.FeaturesDict:
  messages = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
  fields = {
      "text": {"text": tfds.features.Text()},
      "tokens": {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)},
      "dialogues": {"messages": messages},
      "preferences": {"messages": messages, "chosen": tfds.features.Text(),
                      "rejected": tfds.features.Text(), "rating": np.int32,
                      "chosen_safe": np.int32, "rejected_safe": np.int32, "is_safety": np.bool_},
      "prompts": {"messages": messages, "is_safety": np.bool_, "category": tfds.features.Text(),
                  "answer": tfds.features.Text()},
  }[kind]
  return tfds.features.FeaturesDict({"where": tfds.features.Text(), **fields})


def _label(flag: bool | None) -> int:
  return -1 if flag is None else int(flag)


def _rows(kind: str, path: str, bad: text.BadRows, encode=None):
  """The feature dict of every valid row of one file, in file order."""
  source = glob.escape(path)  # the readers take a glob; a file's name is not a pattern
  if kind == "text":
    return ({"where": where, "text": doc} for where, doc in text.text_rows(source, bad))
  if kind == "tokens":
    return ({"where": where, "tokens": np.asarray(encode(doc), np.int32)}
            for where, doc in text.text_rows(source, bad))
  if kind == "dialogues":
    return ({"where": where, "messages": list(messages)}
            for where, messages in chat.read_dialogues(source, bad))
  if kind == "preferences":
    return ({"where": p.where, "messages": list(p.messages), "chosen": p.chosen,
             "rejected": p.rejected, "rating": p.rating, "chosen_safe": _label(p.chosen_safe),
             "rejected_safe": _label(p.rejected_safe), "is_safety": p.is_safety}
            for p in preferences.read_pairs(source, bad))
  return ({"where": p.where, "messages": list(p.messages), "is_safety": p.is_safety,
           "category": p.category, "answer": p.answer}
          for p in preferences.read_prompts(source, bad))


def _file_examples(kind: str, index: int, path: str, bad: text.BadRows, encode=None):
  """(key, feature dict) for every valid row of `path`, the split's index-th file. Keys sort
  by file, then row, and the writers order examples by key, so either writer (the loop or
  Beam's) keeps the files' order."""
  for row, example in enumerate(_rows(kind, path, bad, encode)):
    yield (index << 32) | row, example


@functools.lru_cache(maxsize=None)
def _encoder(tokenizer: str):
  """A SentencePiece model's encode (ids without BOS/EOS), loaded once per process: the loop
  loads it once, each Beam worker once, from the path it was shipped."""
  import sentencepiece
  return sentencepiece.SentencePieceProcessor(model_file=tokenizer).encode


def _worker_examples(element: tuple[int, str], kind: str, split: str, skip: bool,
                     tokenizer: str):
  """The examples of one (index, file) element, made in a Beam worker. Its dropped rows are
  reported as a Beam distribution per reason (count: how many; min: the earliest file),
  which `_JsonlBuilder._process_pipeline_result` adds to the builder's BadRows."""
  index, path = element
  bad = text.BadRows(skip)  # raising (not skipping) fails the pipeline with file:line: reason
  yield from _file_examples(kind, index, path, bad, _encoder(tokenizer) if tokenizer else None)
  metrics = tfds.core.lazy_imports.apache_beam.metrics.Metrics
  for reason, count in bad.dropped.items():
    files = metrics.distribution(f"{_BAD_ROWS}:{split}", reason)
    for _ in range(count):
      files.update(index)


def _beam_examples(kind: str, split: str, files: list[str], skip: bool, tokenizer: str):
  """A PTransform making the examples of `files` in Beam workers, one element per file."""
  beam = tfds.core.lazy_imports.apache_beam
  return (beam.Create(list(enumerate(files)))
          # Without it a runner may fuse the reading into Create and give all files to one worker.
          | "OneFilePerWorker" >> beam.Reshuffle()
          | "Examples" >> beam.FlatMap(_worker_examples, kind, split, skip, tokenizer))


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over our files; `make_builder` gives it a name, kind and sources."""

  VERSION = tfds.core.Version("1.0.0")
  # No code directory holds checksums or metadata for a builder made at run time (and looking
  # for one needs importlib_resources, which this environment does not ship).
  code_path = None
  KIND = "text"
  SOURCES: Mapping[str, str] = {}
  BAD: text.BadRows | None = None
  TOKENIZER: str = ""
  BEAM = False  # generate the examples in a Beam pipeline (build's beam_runner)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=_features(self.KIND), disable_shuffling=True,
        description=f"{self.KIND} from {dict(self.SOURCES)}")

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded: the sources are local files
    return {split: self._generate_examples(split, path) for split, path in self.SOURCES.items()}

  def _generate_examples(self, split, path):
    files = text.document_files(path)
    if self.BEAM:  # TFDS runs a PTransform (not a generator) as a Beam pipeline
      return _beam_examples(self.KIND, split, files, self.BAD.skip, self.TOKENIZER)
    encode = _encoder(self.TOKENIZER) if self.TOKENIZER else None
    return (example for index, file in enumerate(files)
            for example in _file_examples(self.KIND, index, file, self.BAD, encode))

  def _process_pipeline_result(self, pipeline_result):
    """Adds the rows the Beam workers dropped to BAD: per reason, the count and the first one
    (in split, then file order), re-read from the earliest file that dropped one."""
    beam = tfds.core.lazy_imports.apache_beam
    for split, path in self.SOURCES.items():
      found = pipeline_result.metrics().query(
          beam.metrics.MetricsFilter().with_namespace(f"{_BAD_ROWS}:{split}"))
      for result in found["distributions"]:
        # Committed: a retried bundle's attempts are not counted twice.
        reason, files = result.key.metric.name, result.committed or result.attempted
        self.BAD.dropped[reason] = self.BAD.dropped.get(reason, 0) + files.count
        if reason not in self.BAD.first:
          # The tokenizer cannot drop a row: read a "tokens" file as "text".
          earliest, probe = text.document_files(path)[files.min], text.BadRows(skip=True)
          for _ in _rows("text" if self.KIND == "tokens" else self.KIND, earliest, probe):
            pass
          self.BAD.first[reason] = probe.first[reason]


def make_builder(kind: str, splits: Mapping[str, str] | str, data_dir: str, name: str,
                 version: str = "1.0.0", bad: text.BadRows | None = None, tokenizer: str = "",
                 beam: bool = False) -> tfds.core.DatasetBuilder:
  """A TFDS builder writing `kind` records from `splits` (split -> file, directory or glob; a
  plain string is the "train" split) as array_record under data_dir/name/version. "tokens"
  records are text documents tokenized with `tokenizer` (a SentencePiece model path). With
  `beam`, the examples come from a Beam pipeline (prepare it with a DownloadConfig's
  beam_runner, as `build` does)."""
  if kind not in KINDS:
    raise ValueError(f"unknown source kind {kind!r}; kinds are {KINDS}")
  if (kind == "tokens") != bool(tokenizer):
    raise ValueError("kind 'tokens' needs a tokenizer, and only it takes one")
  splits = {"train": splits} if isinstance(splits, str) else dict(splits)
  cls = type("Builder", (_JsonlBuilder,),
             {"name": name, "VERSION": tfds.core.Version(version), "KIND": kind,
              "SOURCES": splits, "BAD": bad if bad is not None else text.BadRows(),
              "TOKENIZER": tokenizer, "BEAM": beam, "__module__": __name__},
             skip_registration=True)
  return cls(data_dir=data_dir, file_format="array_record")


def build(kind: str, splits: Mapping[str, str] | str, data_dir: str, name: str,
          version: str = "1.0.0", bad: text.BadRows | None = None, tokenizer: str = "",
          beam_runner: str | None = None, beam_options: Sequence[str] = ()) -> str:
  """Prepares the dataset (a no-op if this name and version exist already); returns its
  directory. Bad rows go to `bad` (default: the first one fails the build, nothing written).

  build("tokens", "corpus/*.jsonl", data_dir, "c4_ids", tokenizer="tokenizer.model") writes
  pre-tokenized shards that a pretraining stage streams as `tfds:c4_ids` without tokenizing.

  By default a loop in this process makes the examples. With `beam_runner` ("DirectRunner",
  "FnApiRunner", "DataflowRunner", ...; needs the "beam" extra) TFDS makes them in an Apache
  Beam pipeline instead: one element per file (so one huge file is one worker's work), read,
  checked and tokenized in a worker that loads the tokenizer from its path. `beam_options` are
  Beam's flags (["--direct_num_workers=2", "--direct_running_mode=multi_processing"]); every
  worker must open the same source, tokenizer and data_dir paths. The records, and their
  order, are the loop's (keys sort by file, then row); only the shard boundaries may differ.
  What differs for bad rows: failing, the build stops at the bad row some worker met first
  (not necessarily the earliest), the DataError's message suffixed with the Beam step;
  skipping, `bad` gets the workers' counts (Beam metrics) when the pipeline has finished, and
  per reason the first one, re-read here from the earliest file that dropped one."""
  if beam_options and beam_runner is None:
    raise ValueError("beam_options need a beam_runner")
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  if beam_runner is not None:
    options = tfds.core.lazy_imports.apache_beam.options.pipeline_options
    config = tfds.download.DownloadConfig(
        try_download_gcs=False, beam_runner=beam_runner,
        beam_options=options.PipelineOptions(list(beam_options)))
  builder = make_builder(kind, splits, data_dir, name, version, bad, tokenizer,
                         beam=beam_runner is not None)
  builder.download_and_prepare(download_config=config)
  return os.fspath(builder.data_path)


def _decode(value):
  """TFDS hands text back as bytes without TensorFlow; sequences of dicts come as dicts of lists."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
    return [_decode(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


decode = _decode  # public: the streaming reader decodes records the same way


def _messages(columns: dict) -> list[dict]:
  return [{"role": role, "content": content}
          for role, content in zip(columns["role"], columns["content"])]


def data_source(name: str, split: str, data_dir: str | None = None):
  """The random-access source of a prepared array_record TFDS dataset (ours or the catalog's).
  `name` may carry a config and version ("wiki/en:1.0.0"); `data_dir` is where it was
  prepared. Nothing is downloaded."""
  return tfds.data_source(name, split=split, data_dir=data_dir, try_gcs=False, download=False)


def records(name: str, split: str, data_dir: str | None = None) -> grain.MapDataset:
  """A prepared dataset as a grain MapDataset of python dicts (text as str), for streaming
  pipelines (shuffle, shard, batch with grain)."""
  return grain.MapDataset.source(data_source(name, split, data_dir)).map(_decode)


def _all_records(name: str, split: str, data_dir: str | None, chunk: int = 4096):
  """Every record in order, read in chunks (a per-record grain iteration costs ~10x more when
  the whole split is materialised for packing)."""
  source = data_source(name, split, data_dir)
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
      yield _decode(record)


def documents(name: str, split: str, data_dir: str | None = None, field: str = "text",
              bad: text.BadRows | None = None) -> list[str]:
  """The `field` of every record: our text datasets, or a catalog dataset's text feature.
  A record without a non-empty string there goes to `bad`."""
  bad = bad if bad is not None else text.BadRows()
  docs = []
  for index, record in enumerate(_all_records(name, split, data_dir)):
    where = record.get("where") or f"{name}/{split}[{index}]"
    value = record.get(field)
    if not isinstance(value, str):
      bad(where, "missing field", f"needs a string field {field!r}")
    elif not value.strip():
      bad(where, "empty text", f"empty {field!r}")
    else:
      docs.append(value)
  return docs


def dialogues(name: str, split: str, data_dir: str | None = None) -> list[tuple[str, list[dict]]]:
  """[(where, messages)] of a dialogues dataset, as chat.read_dialogues gives them."""
  return [(r["where"], _messages(r["messages"])) for r in _all_records(name, split, data_dir)]


def _flag(label: int) -> bool | None:
  return None if label < 0 else bool(label)


def pairs(name: str, split: str, data_dir: str | None = None) -> list[preferences.Pair]:
  """The preference pairs of a preferences dataset, as preferences.read_pairs gives them."""
  return [preferences.Pair(r["where"], tuple(_messages(r["messages"])), r["chosen"], r["rejected"],
                           r["rating"], _flag(r["chosen_safe"]), _flag(r["rejected_safe"]),
                           bool(r["is_safety"]))
          for r in _all_records(name, split, data_dir)]


def prompts(name: str, split: str, data_dir: str | None = None) -> list[preferences.Prompt]:
  """The prompts of a prompts dataset, as preferences.read_prompts gives them."""
  return [preferences.Prompt(r["where"], tuple(_messages(r["messages"])), bool(r["is_safety"]),
                             r["category"], r["answer"])
          for r in _all_records(name, split, data_dir)]
