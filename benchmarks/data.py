"""Data-pipeline throughput, and the streaming pretraining path at corpus scale.

  python benchmarks/data.py [--size=tiny] [--vocab=512] [--seq=512] [--batch=8]
  python benchmarks/data.py --streaming [--corpus-mb=20] [--big-mb=100,1000] [--mfu=0.5]

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

`--streaming` generates JSONL corpora under the temporary
directory (deleted after) and reports, side by side: tokens/s of the streaming path with 0, 1
and 2 grain workers against the in-memory path (read all, tokenize all, pack, shuffle); peak RSS
and time to the first batch, each in a fresh process, for corpora of each `--big-mb` size; and
the tokens/s one v5p host must deliver for 7B and 70B at a stated MFU.
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


WORDS = None


def write_corpus(directory: str, megabytes: int, files: int = 16, seed: int = 0) -> int:
  """`files` JSONL shards of about `megabytes` MB in all: documents of 40-400 words drawn
  Zipf-like from 5000 made-up words (a 4 MB block, re-numbered per copy). Returns documents."""
  import json
  import random
  rng = random.Random(seed)
  letters = "abcdefghiklmnoprstuvwyz"
  words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
  weights = [1 / (rank + 1) for rank in range(len(words))]
  block = []
  while sum(map(len, block)) < 4 << 20:
    doc = " ".join(rng.choices(words, weights, k=rng.randint(40, 400))) + "."
    block.append(json.dumps(doc.capitalize())[1:])  # the rest of a {"text": "... line
  os.makedirs(directory, exist_ok=True)
  outs = [open(os.path.join(directory, f"part-{i:03d}.jsonl"), "w") for i in range(files)]
  written, count = 0, 0
  while written < megabytes << 20:
    for line in block:
      entry = f'{{"text": "{count} {line}}}\n'
      outs[count % files].write(entry)
      written, count = written + len(entry), count + 1
  for out in outs:
    out.close()
  return count


def _rss_mb() -> tuple[float, float]:
  """Peak RSS (MB) of this process and of its largest finished child (grain workers)."""
  import resource
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return own, children


def first_batch(path: str, corpus: str, tokenizer: str, seq: str, batch: str, window: str,
                workers: str) -> None:
  """In a fresh process: seconds to the first batch and peak RSS, streaming or in memory."""
  import json
  from data_pipelines import streaming
  from lm.tokenizer import Tokenizer
  tok = Tokenizer(tokenizer)
  seq, batch, window, workers = int(seq), int(batch), int(window), int(workers)
  with open("/proc/self/statm") as f:  # resident now (the peak so far may be an import's)
    baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  start = time.perf_counter()
  if path == "streaming":
    cfg = streaming.StreamConfig(seq_len=seq, batch_size=batch, shuffle_window=window,
                                 workers=workers)
    stream = streaming.StreamingBatches(streaming.Corpus.open(corpus),
                                        streaming.SentencePieceEncoder(tokenizer), tok.bos_id,
                                        tok.eos_id, cfg)
  else:
    rows = text.pack_documents(text.tokenize_all(text.read_documents(corpus), tok.encode), seq,
                               tok.bos_id, tok.eos_id)
    stream = text.PackedBatches(rows, text.PackingConfig(seq, batch, seed=0))
  next(stream)
  seconds = time.perf_counter() - start
  for _ in range(20):  # a little past the first window: steady-state memory
    next(stream)
  own, _ = _rss_mb()
  with open("/proc/self/statm") as f:
    now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  if hasattr(stream, "close"):
    stream.close()
  print(json.dumps({"seconds": seconds, "rss_mb": own, "imports_mb": baseline, "now_mb": now,
                    "worker_rss_mb": _rss_mb()[1]}))


def _tokens_per_second(make, tokens: int) -> tuple[float, float]:
  """(seconds to the first batch, tokens/s after it) over `tokens` tokens of batches."""
  start = time.perf_counter()
  stream = make()
  first = next(stream)
  begun = time.perf_counter()
  per_batch, done = first["tokens"].size, 0
  while done < tokens:
    next(stream)
    done += per_batch
  rate = done / (time.perf_counter() - begun)
  if hasattr(stream, "close"):
    stream.close()
  return begun - start, rate


def host_needs(mfu: float) -> list[tuple[str, float]]:
  """Tokens/s one v5p host (4 chips) consumes at `mfu` for the 7B and 70B presets."""
  from lm import configs, hardware
  needs = []
  for preset in ("7b", "70b"):
    cfg = configs.get_preset(preset)
    flops = hardware.flops_per_token(configs.param_count(cfg), cfg.n_layers, 4096, cfg.dim)
    needs.append((preset, 4 * hardware.PEAK_FLOPS["TPU v5p"] * mfu / flops))
  return needs


def streaming_main(argv) -> None:
  import json
  import subprocess
  from data_pipelines import streaming
  from lm.tokenizer import Tokenizer
  parser = argparse.ArgumentParser(description="the streaming pretraining path")
  parser.add_argument("--corpus-mb", type=int, default=20, help="corpus for tokens/s")
  parser.add_argument("--big-mb", default="100,1000", help="corpora for RSS / first batch")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--window", type=int, default=256, help="shuffle window, rows")
  parser.add_argument("--tokens", type=float, default=4e6, help="tokens timed per system")
  parser.add_argument("--vocab", type=int, default=8000)
  parser.add_argument("--mfu", type=float, default=0.5)
  parser.add_argument("--skip-in-memory-over-mb", type=int, default=200)
  parser.add_argument("--no-throughput", action="store_true", help="only RSS / first batch")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    small = os.path.join(tmp, "small")
    write_corpus(small, args.corpus_mb)
    sample = text.read_documents(os.path.join(small, "part-000.jsonl"))[:2000]
    tok_path = os.path.join(tmp, "tokenizer.model")
    train_tokenizer(sample, args.vocab, tok_path)
    tok = Tokenizer(tok_path)
    print(f"\n{os.cpu_count()} cores, seq {args.seq}, host batch {args.batch}, shuffle window "
          f"{args.window} rows, SentencePiece vocab {tok.vocab_size}, {args.corpus_mb} MB JSONL")
    print(f"{'path':<26}{'first batch s':>14}{'then tokens/s':>14}{'epoch tokens/s':>16}")
    epoch = []

    def in_memory():
      rows = text.pack_documents(text.tokenize_all(text.read_documents(small), tok.encode),
                                 args.seq, tok.bos_id, tok.eos_id)
      epoch.append(rows.size)
      return text.PackedBatches(rows, text.PackingConfig(args.seq, args.batch))
    systems = {"in memory (read all)": in_memory}
    for workers in (0, 1, 2):
      cfg = streaming.StreamConfig(seq_len=args.seq, batch_size=args.batch,
                                   shuffle_window=args.window, workers=workers)
      systems[f"streaming, {workers} workers"] = (
          lambda cfg=cfg: streaming.StreamingBatches(
              streaming.Corpus.open(small), streaming.SentencePieceEncoder(tok_path),
              tok.bos_id, tok.eos_id, cfg))
    for name, make in (systems.items() if not args.no_throughput else ()):
      first, rate = _tokens_per_second(make, int(args.tokens))
      # One pass over the corpus, start-up included: what a run of one epoch sees.
      whole = epoch[0] / (first + epoch[0] / rate)
      print(f"{name:<26}{first:>14.1f}{rate:>14,.0f}{whole:>16,.0f}")

    print(f"\n{'corpus':>8} {'path':<12}{'first batch s':>14}{'peak RSS MB':>12}"
          f"{'RSS after imports':>18}{'RSS at batch 21':>16}")
    for megabytes in map(int, args.big_mb.split(",")):
      big = os.path.join(tmp, f"big{megabytes}")
      write_corpus(big, megabytes, seed=1)
      paths = ["streaming"] + (["in-memory"] if megabytes <= args.skip_in_memory_over_mb else [])
      for path in paths:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--first-batch", path,
                              big, tok_path, str(args.seq), str(args.batch), str(args.window),
                              "0"], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{megabytes:>6}MB {path:<12}{r['seconds']:>14.1f}{r['rss_mb']:>12.0f}"
              f"{r['imports_mb']:>18.0f}{r['now_mb']:>16.0f}")
      subprocess.run(["rm", "-rf", big], check=True)

    print(f"\nneeded per v5p host (4 chips x 459 TFLOP/s bf16) at MFU {args.mfu:.0%}, "
          "6N + 12LTD FLOPs per token, 4096-token rows:")
    for preset, need in host_needs(args.mfu):
      print(f"  {preset:>4}: {need:>10,.0f} tokens/s")


def main(argv=None):
  args = sys.argv[1:] if argv is None else argv
  if "--streaming" in args:
    return streaming_main([a for a in args if a != "--streaming"])
  if args[:1] == ["--first-batch"]:
    return first_batch(*args[1:])
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
