"""`lm eval EXPERIMENT --workdir=DIR [--stage=NAME] [--checkpoint=MODEL_DIR]`: a stage's evals.

  lm eval experiments/pretrain.py:tiny --workdir=/tmp/run --stage=pretrain
  lm eval experiments/pretrain.py:tiny --workdir=/tmp/run --checkpoint=/tmp/other/pretrain

Runs the evaluations the stage runs at its end, on the stage's own output or on any model
directory, and prints them as JSON.
"""

from __future__ import annotations

import json

from absl import flags

from lm.commands import _experiment

WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (for earlier stages' outputs).")
STAGE = flags.DEFINE_string("stage", None, "The stage whose evals to run (default: the last).")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (default: the stage's).")


prepare_argv = _experiment.prepare_argv


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm eval: unexpected arguments {argv[1:]}")
  if _experiment.CONFIG.value is None or WORKDIR.value is None:
    raise SystemExit("usage: lm eval EXPERIMENT.py:PRESET --workdir=DIR [--stage=NAME] "
                     "[--checkpoint=MODEL_DIR]")
  from lm import pipeline
  try:
    metrics = pipeline.evaluate_stage(_experiment.CONFIG.value, WORKDIR.value, STAGE.value,
                                      CHECKPOINT.value)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"lm eval: {e}")
  print(json.dumps(metrics, indent=2, sort_keys=True))
