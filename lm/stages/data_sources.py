"""Data for the language-model stages, chosen by `data.source`.

  "arithmetic"   generated token rows a, a+k, a+2k, ... (mod vocab): no files, no tokenizer; the
                 smoke-test source, on which a model visibly learns in a few dozen steps
  a stage name   the pretraining text an earlier stage wrote (the `world` stage), tokenized
                 with the experiment's tokenizer
  a path         .jsonl / .txt files or a directory of them (data_pipelines/text.py); the eval
                 split comes from `data.eval_source`
  "tfds:NAME[@SPLIT]"  a prepared array_record TFDS dataset (ours or the catalog's) under
                 `data.data_dir`; its `data.text_field` (default "text"); the eval split is
                 "eval" unless `data.eval_source` names another

Every source yields the batch schema the LM loss takes: tokens, targets, loss_mask,
segment_ids, positions, each [B, T], as numpy arrays, and keeps a resumable position.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import text
from lm.evals import facts
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


def _text_path(data_cfg, outputs: dict, split: str) -> str:
  """`source` is an earlier stage that wrote pretraining text (e.g. "world") or a path."""
  if not data_cfg.source:
    raise ValueError("data.source is empty: give the corpus, e.g. "
                     "--config.stages.pretrain.data.source=/data/corpus (.jsonl/.txt files)")
  if data_cfg.source in outputs:
    return os.path.join(outputs[data_cfg.source], "pretrain", f"{split}.jsonl")
  return data_cfg.source if split == "train" else data_cfg.eval_source or data_cfg.source


def _packed_rows(data_cfg, tokenizer_path, outputs, split, bad: text.BadRows | None = None
                 ) -> np.ndarray:
  path = _text_path(data_cfg, outputs, split)
  if not tokenizer_path:
    raise ValueError(f"data.source={data_cfg.source!r} is text and needs a tokenizer "
                     "(the stage's `tokenizer`: an earlier stage or a tokenizer.model path)")
  tokenizer = Tokenizer(tokenizer_path)
  bad = bad if bad is not None else text.BadRows(data_cfg.skip_bad_rows)
  if path.startswith("tfds:"):
    from data_pipelines import tfds_sources  # imports TFDS only for TFDS sources
    name, tfds_split = tfds_sources.parse_source(path, split)
    documents = tfds_sources.documents(name, tfds_split, data_cfg.data_dir or None,
                                       data_cfg.text_field, bad)
  else:
    documents = text.read_documents(path, bad)
  return text.pack_documents(text.tokenize_all(documents, tokenizer.encode), data_cfg.seq_len,
                             tokenizer.bos_id, tokenizer.eos_id)


def pretrain_batches(data_cfg, tokenizer_path: str | None, vocab: int, batch_size: int,
                     rows: tuple[int, int], seed: int, outputs: dict):
  """The training stream of a pretraining stage."""
  if data_cfg.source == ARITHMETIC:
    return ArithmeticRows(vocab, data_cfg.seq_len, batch_size, seed, rows)
  bad = text.BadRows(data_cfg.skip_bad_rows)
  packed = _packed_rows(data_cfg, tokenizer_path, outputs, "train", bad)
  stream = text.PackedBatches(packed, text.PackingConfig(data_cfg.seq_len, batch_size, seed, rows))
  stream.dropped = bad.dropped
  return stream


def eval_batches(data_cfg, tokenizer_path: str | None, vocab: int, batch_size: int,
                 rows: tuple[int, int], outputs: dict) -> list[dict]:
  """A fixed list of held-out batches (the same every time, so eval numbers compare)."""
  if data_cfg.source == ARITHMETIC:
    # A seed no training run uses: held-out rows.
    stream = ArithmeticRows(vocab, data_cfg.seq_len, batch_size, seed=2**31 - 1, rows=rows)
    return [next(stream) for _ in range(data_cfg.eval_batches)]
  packed = _packed_rows(data_cfg, tokenizer_path, outputs, "eval")
  return text.fixed_batches(packed, batch_size, data_cfg.eval_batches, rows)


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
