"""`lm run EXPERIMENT --workdir=DIR [--config.a.b=value ...]`: run an experiment's stages.

  lm run experiments/pretrain.py:tiny --workdir=/tmp/run
  lm run experiments/pretrain.py:7b --workdir=gs://bucket/run --config.mesh.fsdp=-1

Rerunning the same command resumes: finished stages are skipped, an interrupted one continues
from its last checkpoint.
"""

from __future__ import annotations

from absl import flags

from lm.commands import _experiment

WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage writes its outputs.")


prepare_argv = _experiment.prepare_argv


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm run: unexpected arguments {argv[1:]}")
  if _experiment.CONFIG.value is None or WORKDIR.value is None:
    raise SystemExit("usage: lm run EXPERIMENT.py:PRESET --workdir=DIR [--config.a.b=value]")
  from lm import pipeline
  try:
    pipeline.run_experiment(_experiment.CONFIG.value, WORKDIR.value)
  except (ValueError, PermissionError, FileNotFoundError) as e:
    raise SystemExit(f"lm run: {e}")
