"""Pretraining (LLAMA2.md §3).

  lm run experiments/pretrain.py:smoke --workdir=/tmp/smoke         # CPU, a minute
  lm run experiments/pretrain.py:tiny --workdir=/tmp/pretrain       # CPU, synthetic world
  lm aot experiments/pretrain.py:70b --topology=v5p-512              # will it fit?
  lm run experiments/pretrain.py:7b --workdir=gs://B/7b \
      --config.stages.pretrain.data.source=/data/corpus              # on every host of a pod

Presets: smoke (generated token rows), tiny (CPU, minutes), bench (bench-50M shape), 7b, 13b, 34b, 70b (the paper's settings:
AdamW 0.9/0.95/1e-5, wd 0.1, clip 1.0, 2000 warmup steps then cosine to 10 %, 4M-token batches
of 4096-token sequences, peak LR 3e-4 or 1.5e-4).
"""

from __future__ import annotations

import ml_collections

from experiments import common
from lm.stages import data_sources, pretrain, tokenizer, world

PRESETS = ("smoke", "tiny", "bench") + common.PAPER_SIZES


def pretrain_stage(preset: str) -> ml_collections.ConfigDict:
  if preset in common.PAPER_SIZES:
    cfg = pretrain.Config(
        model=common.model(preset, remat="full"),
        tokenizer="",  # path to Meta's tokenizer.model
        data=data_sources.PretrainData(source="", seq_len=4096, eval_batches=16),
        # The 4M-token batch; 70B needs 4 micro-batches per step on v5p-512 (see `lm aot`).
        train=common.train(steps=common.PRETRAIN_STEPS, batch_size=1024, grad_accum=4,
                           log_every=10, eval_every=1000, checkpoint_every=1000),
        optimizer=common.optimizer(lr=common.PRETRAIN_PEAK_LR[preset], warmup_steps=2000))
  elif preset == "smoke":  # a minute on a laptop: generated token rows, no data files
    cfg = pretrain.Config(
        model=common.model("tiny", max_seq_len=64),
        data=data_sources.PretrainData(source="arithmetic", seq_len=64, eval_batches=2),
        train=common.train(steps=60, batch_size=16, log_every=10, checkpoint_every=30),
        optimizer=common.optimizer(lr=3e-3, warmup_steps=6))
  elif preset == "bench":  # the benchmark shape, on generated rows over the full 32000 vocab
    cfg = pretrain.Config(
        model=common.model("bench-50M"),
        data=data_sources.PretrainData(source="arithmetic", seq_len=512, eval_batches=4),
        train=common.train(steps=200, batch_size=16, log_every=10, checkpoint_every=100),
        optimizer=common.optimizer(lr=1e-3, warmup_steps=20))
  else:  # tiny: sized for 2 CPU cores (see MINIATURE.md)
    cfg = pretrain.Config(
        # Unrolled layers (`scan_layers=False`): the same numbers up to float rounding, training
        # steps ~1.25x faster on XLA:CPU at this depth (README, "Speed on CPU").
        model=common.model("tiny", vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                           ffn_dim=384, max_seq_len=256, scan_layers=False),
        tokenizer="tokenizer",
        data=data_sources.PretrainData(source="world", seq_len=256, eval_batches=4),
        train=common.train(steps=300, batch_size=16, log_every=20, checkpoint_every=100),
        optimizer=common.optimizer(lr=3e-3, warmup_steps=30))
  return common.section(cfg)


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  c = common.base()
  c.stages.pretrain = pretrain_stage(preset)
  if preset in common.PAPER_SIZES or preset in ("smoke", "bench"):
    c.pipeline = ("pretrain",)
  else:
    c.stages.world = common.section(world.Config(size="tiny"))
    c.stages.tokenizer = common.section(tokenizer.Config(
        corpus="world", vocab_size=c.stages.pretrain.model.vocab_size))
    c.pipeline = ("world", "tokenizer", "pretrain")
  return c
