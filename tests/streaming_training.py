"""toy_training.py on the streaming text path: the same runs, kills and resumes, with batches
read from a JSONL corpus through data_pipelines/streaming.py instead of generated rows.

  STREAM_CORPUS=DIR [STREAM_HOSTS=2] [STREAM_WORKERS=N] python tests/streaming_training.py
      WORKDIR STEPS [--kill-after-step N] [--kill-during-save N] [--process-id I --port P]

Each of STREAM_HOSTS hosts streams its own shard of the corpus. Run as 2 processes, each reads
its own; run as one, the process reads both shards side by side, so the global batches (and the
loss curve) are the same either way.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  _devices = 4 if "--process-id" in sys.argv else 8
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import toy_training  # noqa: E402
from data_pipelines import streaming  # noqa: E402
from lm import model, trainer  # noqa: E402

BOS, EOS = 1, 2


def ByteEncoder():  # noqa: N802  (one id per byte, inside the toy model's vocabulary)
  return streaming.ByteEncoder(toy_training.CFG.vocab_size)


class Hosts:
  """The global batch of `count` hosts' streams side by side, in one process: what a run of
  `count` processes feeds, host p's rows at [p * B / count, (p + 1) * B / count)."""

  def __init__(self, streams):
    self.streams = streams

  def __next__(self):
    batches = [next(s) for s in self.streams]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {"hosts": [s.get_state() for s in self.streams]}

  def set_state(self, state):
    for s, host in zip(self.streams, state["hosts"]):
      s.set_state(host)

  def close(self):
    for s in self.streams:
      s.close()


def stream(corpus_dir: str, rows: int, index: int, count: int, workers: int = 0):
  """Host `index` of `count`: its `rows` rows of each global batch, from its own shard."""
  cfg = streaming.StreamConfig(seq_len=toy_training.LENGTH, batch_size=rows, seed=5,
                               shuffle_window=16, workers=workers, process_index=index,
                               process_count=count)
  return streaming.StreamingBatches(streaming.Corpus.open(corpus_dir), ByteEncoder(), BOS, EOS,
                                    cfg)


def data_for(corpus_dir: str, hosts: int, workers: int = 0):
  """A multi-process run: this process's host stream; one process: all `hosts` side by side."""
  rows = toy_training.BATCH // hosts
  if jax.process_count() > 1:
    return Hosts([stream(corpus_dir, rows, jax.process_index(), hosts, workers)])
  return Hosts([stream(corpus_dir, rows, i, hosts, workers) for i in range(hosts)])


def train(workdir: str, steps: int, **kwargs) -> dict:
  tr, mesh = toy_training.make_trainer(steps, checkpoint_every=4, **kwargs)
  data = data_for(os.environ["STREAM_CORPUS"], int(os.environ.get("STREAM_HOSTS", "2")),
                  int(os.environ.get("STREAM_WORKERS", "0")))
  try:
    return trainer.run(tr, params=lambda: model.create(toy_training.CFG, mesh, seed=0)[1],
                       data=data, workdir=workdir)
  finally:
    data.close()


if __name__ == "__main__":
  toy_training.train = train  # toy_training's kill and multi-process options, this data
  toy_training.main(sys.argv)
