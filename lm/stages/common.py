"""What every stage needs: its context, and model/mesh/optimizer/trainer built from its config."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from lm import checkpoints, config_utils, configs, optim, sharding, trainer
from lm.configs import ModelConfig

METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class StageContext:
  """Where a stage runs: its own output directory and the outputs of the stages before it."""

  name: str
  directory: str
  outputs: dict  # stage name -> output directory, for every finished earlier stage
  mesh_config: sharding.MeshConfig
  seed: int

  def output_of(self, reference: str) -> str:
    """A previous stage's output directory by name, or a path as given."""
    if reference in self.outputs:
      return self.outputs[reference]
    if os.path.isdir(reference):
      return reference
    raise ValueError(f"stage {self.name!r}: {reference!r} is neither an earlier stage "
                     f"({sorted(self.outputs)}) nor a directory")

  def mesh(self) -> jax.sharding.Mesh:
    return sharding.make_mesh(self.mesh_config)


def model_config(cfg: ml_collections.ConfigDict, where: str) -> ModelConfig:
  return config_utils.from_config(ModelConfig, cfg, where)


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` section of an experiment: every ModelConfig field of a preset, overridable."""
  return config_utils.to_config(configs.get_preset(preset, **overrides))


def optimizer(cfg: ml_collections.ConfigDict, where: str) -> optim.OptimizerConfig:
  return config_utils.from_config(optim.OptimizerConfig, cfg, where)


def train_config(cfg: ml_collections.ConfigDict, where: str) -> trainer.TrainConfig:
  return config_utils.from_config(trainer.TrainConfig, cfg, where)


def write_metrics(directory: str, metrics: dict) -> None:
  """The stage's final metrics; its presence marks the stage finished, so it is written last."""
  checkpoints.write_atomically(os.path.join(directory, METRICS_FILE),
                               json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def read_metrics(directory: str) -> dict | None:
  path = os.path.join(directory, METRICS_FILE)
  return json.load(open(path)) if os.path.exists(path) else None
