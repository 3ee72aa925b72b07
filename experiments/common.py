"""Building blocks shared by experiment files: a stage's section from its typed config, the mesh,
the paper's numbers.

A stage section is `section(SomeStage.Config(...))`: every field of the stage kind's typed config
(lm/stages/<kind>.py), its defaults written once there, each overridable from the command line.
"""

from __future__ import annotations

import ml_collections

from lm import config_utils, configs, optim, trainer
from lm.stages import kit

PAPER_SIZES = ("7b", "13b", "34b", "70b")
# LLAMA2.md §3.2: peak pretraining LR by size.
PRETRAIN_PEAK_LR = {"7b": 3e-4, "13b": 3e-4, "34b": 1.5e-4, "70b": 1.5e-4}
# 2.0T tokens at 1024 x 4096 tokens per step (LLAMA2.md §3.2; the paper gives no step count).
PRETRAIN_STEPS = 476_837


def base(seed: int = 0) -> ml_collections.ConfigDict:
  """The top level every experiment has: seed, mesh, multi-host settings, pipeline, stages."""
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.mesh = ml_collections.ConfigDict(dict(dcn=1, data=1, fsdp=-1, tensor=1))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator="", num_processes=1, process_id=0, cpu_collectives=""))
  c.pipeline = ()
  c.stages = ml_collections.ConfigDict()
  return c


def section(stage_config) -> ml_collections.ConfigDict:
  """A stage's config section: every field of its typed Config."""
  return config_utils.to_config(stage_config)


def model(preset: str, **overrides) -> configs.ModelConfig:
  return configs.get_preset(preset, **overrides)


optimizer = optim.OptimizerConfig
train = trainer.TrainConfig
data = kit.DataConfig
