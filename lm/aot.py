"""Ahead-of-time compilation of a stage's programs for a TPU slice, on any host (`lm aot`).

With libtpu installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies` describes a TPU
slice's devices without owning them; compiling the real train step (and, for a stage that samples,
its generation program) against that mesh gives XLA's own per-chip memory and cost figures, so a
70B run's fit is known before a pod is booked.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from lm import checkpoints, config_utils, hardware, sharding
from lm.configs import ModelConfig

GiB = hardware.GiB

@dataclasses.dataclass
class FitReport:
  """Per-chip figures of one compiled program."""

  program: str  # a name in the stage module's PROGRAMS
  topology: str
  chips: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  generated_code_bytes: int
  hbm_bytes: int
  xla_flops: float
  model_flops: float  # per chip: 6N + attention per token trained, a third of it per token sampled

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
    lines = [f"{self.program} on topology {self.topology}: {self.chips} chips", "per-chip memory:"]
    lines += [f"  {name:<18} {value / GiB:9.2f} GiB" for name, value in rows]
    lines.append(f"model FLOPs: {self.model_flops / 1e12:,.1f} TFLOP per chip per call")
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


def compile_program(program: str, fn, args: tuple, mesh, topology: str,
                    model_flops_per_call: float = 0.0) -> FitReport:
  """Lowers and compiles `fn` (jitted; shardings on it or on the abstract `args`; the sharding
  plan of its activations is in the model's graphdef)."""
  with jax.set_mesh(mesh):
    compiled = fn.lower(*args).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return FitReport(
      program=program, topology=topology, chips=mesh.size,
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      generated_code_bytes=memory.generated_code_size_in_bytes, hbm_bytes=hbm_bytes(topology),
      xla_flops=float((cost or {}).get("flops", 0.0)),
      model_flops=model_flops_per_call / mesh.size,
  )


def stage_model(config, stage: str) -> ModelConfig:
  """The model a stage trains, as `lm run` resolves it: for a stage that starts from another
  (`init_from`), that stage's model, followed through the experiment (or read from a model
  directory when init_from is a path); otherwise its own `model` section."""
  seen = []
  while True:
    section = config.stages[stage]
    source = section.get("init_from", "")
    if not source and "model" in section:
      return config_utils.from_config(ModelConfig, section.model, f"stages.{stage}.model")
    seen.append(stage)
    if source in config.stages and source not in seen:
      stage = source
    elif source and os.path.isdir(source):
      return checkpoints.read_model_info(source)[0]
    else:
      raise ValueError(f"stage {stage!r} has no model section and its init_from {source!r} is "
                       f"neither a stage of this experiment nor a model directory")


def fit_reports(config, topology: str, stage: str | None = None) -> dict[str, FitReport]:
  """Compiles every program one stage of an experiment config declares (its module's
  PROGRAMS) for `topology`; returns their figures by program name, the train step first."""
  from lm.stages import stage_module, typed_config
  compiled = [n for n in config.pipeline
              if getattr(stage_module(config.stages[n].kind), "PROGRAMS", None)]
  if stage is None:
    if not compiled:
      raise ValueError("the experiment has no stage with programs to compile")
    stage = compiled[-1]
  if stage not in compiled:
    raise ValueError(f"stage {stage!r} has no programs to compile; stages that do: {compiled}")
  cfg = typed_config(config.stages[stage], f"stages.{stage}")
  model_cfg = stage_model(config, stage)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()), devices=devices)
  reports = {}
  for program, builder in stage_module(config.stages[stage].kind).PROGRAMS.items():
    fn, args, flops = builder(cfg, model_cfg, mesh)
    reports[program] = compile_program(program, fn, args, mesh, topology, flops)
  return reports
