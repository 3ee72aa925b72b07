"""`lm aot EXPERIMENT --topology=SLICE [--stage=NAME]`: will this stage fit that TPU slice?

  lm aot experiments/pretrain.py:70b --topology=v5p-512
  lm aot experiments/llama2_chat.py:70b --topology=v5p-512 --stage=gatt

Compiles the stage's real train step (its model, batch, remat policy, mesh and rules), and for a
stage that samples (GAtt) its generation program too, for the slice's devices on this host
(libtpu: `pip install -e ".[tpu]"`), and prints for each XLA's per-chip memory against the chip's
HBM, its FLOP estimate, and `fits: yes|no`.
"""

from __future__ import annotations

import os

from absl import flags

from lm.commands import _experiment

TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice, e.g. v5p-128, v5e-256, v4-64.")
STAGE = flags.DEFINE_string("stage", None, "The stage to compile (default: the last trained one).")


def prepare_argv(argv):
  # The CPU host compiles for TPU; it must not try to initialise a local TPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  return _experiment.prepare_argv(argv)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm aot: unexpected arguments {argv[1:]}")
  if _experiment.CONFIG.value is None or TOPOLOGY.value is None:
    raise SystemExit("usage: lm aot EXPERIMENT.py:PRESET --topology=SLICE [--stage=NAME]")
  from lm import aot
  try:
    reports = aot.fit_reports(_experiment.CONFIG.value, TOPOLOGY.value, STAGE.value)
  except (ValueError, RuntimeError) as e:
    raise SystemExit(f"lm aot: {e}")
  print("\n\n".join(report.table() for report in reports.values()))
