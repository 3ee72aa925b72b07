"""What every stage needs: its context (directory, earlier outputs, mesh, seed) and its metrics file."""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from lm import checkpoints, sharding

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


def write_metrics(directory: str, metrics: dict) -> None:
  """The stage's final metrics; its presence marks the stage finished, so it is written last."""
  checkpoints.write_atomically(os.path.join(directory, METRICS_FILE),
                               json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def read_metrics(directory: str) -> dict | None:
  path = os.path.join(directory, METRICS_FILE)
  return json.load(open(path)) if os.path.exists(path) else None
