"""Data-pipeline throughput on one CPU core, over the synthetic world.

  python benchmarks/data.py [--size=tiny] [--vocab=512] [--seq=512] [--batch=8]

Writes the world and trains a tokenizer in a temporary directory (not timed), pins the process
to one core, then times each pipeline end to end from files on disk to batches:

  pretrain   read JSONL -> tokenize -> concatenate with EOS -> pack -> shuffled batches
  sft        read dialogues -> Llama 2 chat format with loss masks -> pack whole examples
             with segment ids -> shuffled batches
  reward     read preference pairs -> chat format for chosen and rejected -> pack pairs
  tfds text  the pretraining text from an array_record TFDS dataset through grain -> pack
             (preparing the dataset is not timed)

Reported: tokens placed in rows per second. The target is 10x what the bench-50M train step
consumes on the same machine (benchmarks/train_step.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import chat, preferences, text, tfds_sources, world  # noqa: E402
from lm.tokenizer import train_tokenizer  # noqa: E402


def _drain(rows, batch: int, seq: int) -> int:
  """Takes one epoch of shuffled batches; returns the real tokens they hold."""
  batches = text.PackedBatches(rows, text.PackingConfig(seq, batch, seed=0))
  count = (len(rows["tokens"]) if isinstance(rows, dict) else len(rows)) // batch
  real = 0
  for _ in range(count):
    b = next(batches)
    real += int((b["segment_ids"] > 0).sum())
  return real


def bench_pretrain(directory, tokenizer, seq, batch):
  docs = text.read_documents(os.path.join(directory, "pretrain", "train.jsonl"))
  rows = text.pack_documents(text.tokenize_all(docs, tokenizer.encode), seq, tokenizer.bos_id,
                             tokenizer.eos_id)
  return _drain(rows, batch, seq)


def bench_sft(directory, tokenizer, seq, batch):
  dialogues = chat.read_dialogues(os.path.join(directory, "sft", "train.jsonl"))
  rows = chat.pack_examples(chat.encode_examples(dialogues, tokenizer.encode_dialog, seq), seq)
  return _drain(rows, batch, seq)


def bench_reward(directory, tokenizer, seq, batch):
  pairs = preferences.read_pairs(os.path.join(directory, "preferences"))
  rows = preferences.pack_pairs(preferences.encode_pairs(pairs, tokenizer.encode_dialog, seq), seq)
  return _drain(rows, batch, seq)


def bench_tfds_text(data_dir, tokenizer, seq, batch):
  docs = tfds_sources.documents("world_pretrain", "train", data_dir)
  rows = text.pack_documents(text.tokenize_all(docs, tokenizer.encode), seq, tokenizer.bos_id,
                             tokenizer.eos_id)
  return _drain(rows, batch, seq)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--train-step-tokens", type=float, default=473.0,
                      help="tokens/s of the bench-50M train step on this machine")
  args = parser.parse_args(argv)
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  with tempfile.TemporaryDirectory() as tmp:
    world.write_world(tmp, world.WorldConfig.preset(args.size))
    tokenizer = train_tokenizer(text.read_documents(os.path.join(tmp, "pretrain")), args.vocab,
                                os.path.join(tmp, "tokenizer.model"), num_threads=1)
    data_dir = os.path.join(tmp, "tfds")
    tfds_sources.build("text", os.path.join(tmp, "pretrain", "train.jsonl"), data_dir,
                       "world_pretrain")
    target = 10 * args.train_step_tokens
    print(f"\none core, seq {args.seq}, batch {args.batch}, world {args.size}, "
          f"vocab {tokenizer.vocab_size}; target > {target:,.0f} tokens/s "
          f"(10x the bench-50M train step's {args.train_step_tokens:,.0f})")
    print(f"{'pipeline':<12}{'tokens':>12}{'seconds':>10}{'tokens/s':>14}{'x target':>10}")
    benches = {"pretrain": (bench_pretrain, tmp), "sft": (bench_sft, tmp),
               "reward": (bench_reward, tmp), "tfds text": (bench_tfds_text, data_dir)}
    for name, (fn, where) in benches.items():
      best = None
      for _ in range(args.repeats):
        start = time.perf_counter()
        tokens = fn(where, tokenizer, args.seq, args.batch)
        seconds = time.perf_counter() - start
        best = min(best or seconds, seconds)
      rate = tokens / best
      print(f"{name:<12}{tokens:>12,}{best:>10.2f}{rate:>14,.0f}{rate / target:>10.1f}")


if __name__ == "__main__":
  main()
