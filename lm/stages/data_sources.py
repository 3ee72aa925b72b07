"""Data for the language-model stages, chosen by `data.source`.

  "arithmetic"   generated token rows a, a+k, a+2k, ... (mod vocab): no files, no tokenizer; the
                 smoke-test source, on which a model visibly learns in a few dozen steps
  a stage name   the pretraining text an earlier stage wrote (the `world` stage), tokenized
                 with the experiment's tokenizer
  paths          .jsonl / .txt / .array_record files, directories or globs, comma-separated,
                 local or gs:// (data_pipelines/streaming.py); the eval split is
                 `data.eval_source` (files) or else a held-out `data.eval_fraction` of the chunks
  "tfds:NAME[@SPLIT]"  a prepared array_record TFDS dataset (ours or the catalog's, text or
                 token ids) under `data.data_dir`; its `data.text_field` (default "text"); the
                 eval split is "eval" unless `data.eval_source` names another

Text is streamed: each host reads only its own chunks of the corpus, tokenizes in grain worker
processes and packs as it goes, so memory does not grow with the corpus; the stream's position
(grain iterator state) is checkpointed with the train state.

Every source yields the batch schema the LM loss takes: tokens, targets, loss_mask,
segment_ids, positions, each [B, T], as numpy arrays, and keeps a resumable position.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np

from data_pipelines import streaming, text
from lm.evals import facts
from lm.stages import kit
from lm.tokenizer import Tokenizer

ARITHMETIC = "arithmetic"


class ArithmeticRows:
  """Rows a, a+k, a+2k, ... mod `vocab`, with k in 1..3: deterministic per (seed, batch index).

  `rows` = [start, stop) of each global batch this process feeds (see Trainer.process_rows).
  """

  def __init__(self, vocab: int, seq_len: int, batch_size: int, seed: int,
               rows: tuple[int, int] | None = None, first_token: int = 3):
    self.vocab, self.seq_len, self.batch_size, self.seed = vocab, seq_len, batch_size, seed
    self.rows = rows or (0, batch_size)
    self.first_token = first_token  # keep 0..2 (pad, BOS, EOS) out of the rows
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    span = self.vocab - self.first_token
    start = rng.integers(0, span, (self.batch_size, 1))
    stride = rng.integers(1, 4, (self.batch_size, 1))
    rows = self.first_token + (start + stride * np.arange(self.seq_len + 1)) % span
    rows = rows[self.rows[0]:self.rows[1]].astype(np.int32)
    shape = rows[:, :-1].shape
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
            "loss_mask": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


@dataclasses.dataclass(frozen=True)
class PretrainData(kit.DataConfig):
  """kit.DataConfig plus how text is streamed (data_pipelines/streaming.py). `source` and
  `eval_source` may list several paths, directories or globs, comma-separated.

  eval_fraction: with a path source and no eval_source, this fraction of the corpus's chunks
    is held out for evaluation and never trained on.
  shuffle_window: rows shuffled together on each host; workers: grain worker processes that
    read, tokenize and pack (0: in the training process; keep it fixed across restarts).
  chunk_bytes: the unit of sharding across hosts and workers (bytes of JSONL).
  """

  eval_fraction: float = 0.01
  shuffle_window: int = 1024
  workers: int = 0
  chunk_bytes: int = 8 << 20


def _option(data_cfg, name: str):
  """A PretrainData field, or its default for a plain kit.DataConfig."""
  return getattr(data_cfg, name, getattr(PretrainData, name))


def _corpus(data_cfg, outputs: dict, split: str) -> tuple[streaming.Corpus, str]:
  """(corpus, which of its chunks) of a text source's train or eval split."""
  source = data_cfg.source
  if not source:
    raise ValueError("data.source is empty: give the corpus, e.g. "
                     "--config.stages.pretrain.data.source=/data/corpus (.jsonl/.txt files)")
  opened = functools.partial(streaming.Corpus.open, chunk_bytes=_option(data_cfg, "chunk_bytes"),
                             data_dir=data_cfg.data_dir)
  if source in outputs:  # an earlier stage wrote train.jsonl and eval.jsonl
    return opened(os.path.join(outputs[source], "pretrain", f"{split}.jsonl")), "all"
  if split == "eval" and data_cfg.eval_source:
    return opened(data_cfg.eval_source, split="eval"), "all"
  if source.startswith(streaming.TFDS):
    from data_pipelines import tfds_sources  # imports TFDS only for TFDS sources
    name, tfds_split = tfds_sources.parse_source(source, split)
    return opened(f"{streaming.TFDS}{name}@{tfds_split}"), "all"
  fraction = _option(data_cfg, "eval_fraction")
  if split == "eval" and fraction <= 0:
    raise ValueError(f"data.source={source!r} has no eval split: set data.eval_source (held-out "
                     "files) or data.eval_fraction > 0")
  return opened(source, eval_fraction=0.0 if data_cfg.eval_source else fraction), split


def _stream_config(data_cfg, batch_size: int, seed: int) -> streaming.StreamConfig:
  return streaming.StreamConfig(
      seq_len=data_cfg.seq_len, batch_size=batch_size, seed=seed,
      shuffle_window=_option(data_cfg, "shuffle_window"), workers=_option(data_cfg, "workers"),
      process_index=jax.process_index(), process_count=jax.process_count(),
      skip_bad_rows=data_cfg.skip_bad_rows, text_field=data_cfg.text_field)


def _require_tokenizer(data_cfg, tokenizer_path: str | None) -> str:
  if not tokenizer_path:
    raise ValueError(f"data.source={data_cfg.source!r} is text and needs a tokenizer "
                     "(the stage's `tokenizer`: an earlier stage or a tokenizer.model path)")
  return tokenizer_path


def _encoder(data_cfg, tokenizer_path: str | None):
  tokenizer = Tokenizer(_require_tokenizer(data_cfg, tokenizer_path))
  return streaming.SentencePieceEncoder(tokenizer_path), tokenizer.bos_id, tokenizer.eos_id


def _stage_text_rows(data_cfg, tokenizer_path, outputs, split, bad: text.BadRows) -> np.ndarray:
  """An earlier stage's text (the world's, a few MB) read whole and packed: [N, T + 1] rows.

  The miniature keeps this in-memory path for now: the test chain's learning thresholds were
  measured on its row order, and the streamed order gives another chain (issue 17, item 5)."""
  path = os.path.join(outputs[data_cfg.source], "pretrain", f"{split}.jsonl")
  tokenizer = Tokenizer(_require_tokenizer(data_cfg, tokenizer_path))
  return text.pack_documents(text.tokenize_all(text.read_documents(path, bad), tokenizer.encode),
                             data_cfg.seq_len, tokenizer.bos_id, tokenizer.eos_id)


def pretrain_batches(data_cfg, tokenizer_path: str | None, vocab: int, batch_size: int,
                     rows: tuple[int, int], seed: int, outputs: dict):
  """The training stream of a pretraining stage: this host's rows [start, stop) of each global
  batch, read from its own shard of the corpus."""
  if data_cfg.source == ARITHMETIC:
    return ArithmeticRows(vocab, data_cfg.seq_len, batch_size, seed, rows)
  if data_cfg.source in outputs:
    bad = text.BadRows(data_cfg.skip_bad_rows)
    packed = _stage_text_rows(data_cfg, tokenizer_path, outputs, "train", bad)
    stream = text.PackedBatches(packed, text.PackingConfig(data_cfg.seq_len, batch_size, seed,
                                                           rows))
    stream.dropped = bad.dropped
    return stream
  corpus, split = _corpus(data_cfg, outputs, "train")
  encode, bos, eos = _encoder(data_cfg, tokenizer_path)
  return streaming.StreamingBatches(corpus, encode, bos, eos,
                                    _stream_config(data_cfg, rows[1] - rows[0], seed), split)


def eval_batches(data_cfg, tokenizer_path: str | None, vocab: int, batch_size: int,
                 rows: tuple[int, int], outputs: dict) -> list[dict]:
  """A fixed list of held-out batches (the same every time, so eval numbers compare)."""
  if data_cfg.source == ARITHMETIC:
    # A seed no training run uses: held-out rows.
    stream = ArithmeticRows(vocab, data_cfg.seq_len, batch_size, seed=2**31 - 1, rows=rows)
    return [next(stream) for _ in range(data_cfg.eval_batches)]
  if data_cfg.source in outputs:
    packed = _stage_text_rows(data_cfg, tokenizer_path, outputs, "eval",
                              text.BadRows(data_cfg.skip_bad_rows))
    return text.fixed_batches(packed, batch_size, data_cfg.eval_batches, rows)
  corpus, split = _corpus(data_cfg, outputs, "eval")
  encode, bos, eos = _encoder(data_cfg, tokenizer_path)
  return streaming.fixed_batches(corpus, split, encode, bos, eos,
                                 _stream_config(data_cfg, rows[1] - rows[0], 0),
                                 data_cfg.eval_batches)


def probes(data_cfg, tokenizer_path, outputs: dict):
  """Extra evals of the source (fact completion on the world): role -> metrics, or None."""
  if data_cfg.source not in outputs:
    return None
  path = os.path.join(outputs[data_cfg.source], "probes.jsonl")
  if not os.path.exists(path):
    return None
  tokenizer = Tokenizer(tokenizer_path)
  probe_rows = facts.load_probes(path)
  return lambda role: {"fact_accuracy": facts.fact_accuracy(role, tokenizer, probe_rows)}
