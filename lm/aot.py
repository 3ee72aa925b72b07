"""Ahead-of-time compilation of a train step for a TPU slice, on any host (`lm aot`).

With libtpu installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies` describes a TPU
slice's devices without owning them; compiling the real train step against that mesh gives XLA's
own per-chip memory and cost figures, so a 70B run's fit is known before a pod is booked.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from lm import hardware, sharding

GiB = hardware.GiB


@dataclasses.dataclass
class FitReport:
  """Per-chip figures of one compiled step."""

  topology: str
  chips: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  generated_code_bytes: int
  hbm_bytes: int
  xla_flops: float
  model_flops: float  # 6N + attention per token, times the step's tokens, per chip

  @property
  def total_bytes(self) -> int:
    # Donated arguments alias their outputs, so they are counted once.
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.generated_code_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  def table(self) -> str:
    rows = [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
            ("aliased (donated)", -self.alias_bytes), ("temporaries", self.temp_bytes),
            ("code", self.generated_code_bytes), ("total", self.total_bytes),
            ("HBM per chip", self.hbm_bytes)]
    lines = [f"topology {self.topology}: {self.chips} chips", "per-chip memory:"]
    lines += [f"  {name:<18} {value / GiB:9.2f} GiB" for name, value in rows]
    lines.append(f"model FLOPs: {self.model_flops / 1e12:,.1f} TFLOP per chip per step")
    # XLA counts a loop body once, so its figure covers one layer of the scan, not the step.
    lines.append(f"XLA cost estimate: {self.xla_flops / 1e12:,.1f} TFLOP per chip "
                 "(loop bodies counted once)")
    lines.append(f"fits: {'yes' if self.fits else 'no'}")
    return "\n".join(lines)


def topology_devices(name: str) -> list[Any]:
  """The devices of a slice such as 'v5p-128' (or a raw topology string such as 'v5p:4x4x4')."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compiling for a described topology owns no chip, so several processes may do it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  if name in hardware.TOPOLOGIES:
    topology = hardware.TOPOLOGIES[name][0]
  elif ":" in name:
    topology = name
  else:
    raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(hardware.TOPOLOGIES)}")
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1)
  except Exception as e:  # no libtpu, or a topology libtpu does not know
    raise RuntimeError(f"cannot describe TPU topology {topology!r} ({e}); "
                       "install libtpu with: pip install -e '.[tpu]'") from e
  return list(desc.devices)


def hbm_bytes(name: str) -> int:
  generation = name.split("-")[0].split(":")[0]
  if generation not in hardware.HBM_BYTES:
    raise ValueError(f"no HBM figure for {generation!r}; known: {sorted(hardware.HBM_BYTES)}")
  return hardware.HBM_BYTES[generation]


def compile_step(step_fn, args: tuple, mesh, rules: sharding.Rules, topology: str,
                 model_flops_per_step: float = 0.0) -> FitReport:
  """Lowers and compiles `step_fn` (already jitted with shardings) on abstract `args`."""
  with jax.set_mesh(mesh), sharding.use_rules(rules):
    compiled = step_fn.lower(*args).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return FitReport(
      topology=topology, chips=mesh.size,
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      generated_code_bytes=memory.generated_code_size_in_bytes, hbm_bytes=hbm_bytes(topology),
      xla_flops=float((cost or {}).get("flops", 0.0)),
      model_flops=model_flops_per_step / mesh.size,
  )


def fit_report(config, topology: str, stage: str | None = None) -> FitReport:
  """Compiles one stage of an experiment config for `topology` and returns the figures."""
  from lm.stages import stage_module
  trained = [n for n in config.pipeline
             if hasattr(stage_module(config.stages[n].kind), "train_step_for_aot")]
  if stage is None:
    if not trained:
      raise ValueError("the experiment has no trained stage to compile")
    stage = trained[-1]
  if stage not in trained:
    raise ValueError(f"stage {stage!r} is not a trained stage of this experiment ({trained})")
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()), devices=devices)
  step_fn, args, rules, flops = stage_module(config.stages[stage].kind).train_step_for_aot(
      config.stages[stage], mesh)
  return compile_step(step_fn, args, mesh, rules, topology, flops)
