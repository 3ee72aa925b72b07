"""Runs an experiment: its stages in order, each from the previous one's output.

A stage whose directory holds `metrics.json` is finished and skipped; any other stage runs, and a
stage that was interrupted resumes from its own checkpoints. So rerunning the same command after a
crash or a preemption picks up where the run stopped.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import ml_collections

from lm import checkpoints, hardware, metrics_io, report, sharding, trainer
from lm.stages import common, stage_module, typed_config


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict | None) -> None:
  """Multi-host: `jax.distributed.initialize` when the config or the environment asks for it.

  On a TPU pod every host runs the same command and JAX finds its peers by itself
  (`distributed.enabled=True`, nothing else). Elsewhere give coordinator, num_processes and
  process_id (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
  """
  wanted = bool(cfg and cfg.get("enabled")) or "JAX_COORDINATOR_ADDRESS" in os.environ
  if not wanted or jax.distributed.is_initialized():
    return
  kwargs = {}
  if cfg and cfg.get("coordinator"):
    kwargs = dict(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
  # Set before initialize() and without asking for the backend (that would start it, which
  # initialize() forbids); it only affects CPU devices.
  jax.config.update("jax_cpu_collectives_implementation",
                    (cfg.get("cpu_collectives") if cfg else None) or "gloo")
  jax.distributed.initialize(**kwargs)


def run_experiment(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict:
  """Runs `config.pipeline` under `workdir`; returns {stage: metrics} for the stages that ran."""
  trainer.check_workdir_writable(workdir)
  maybe_initialize_distributed(config.get("distributed"))
  advice = hardware.allocator_advice()  # only now: asking for the backend starts it
  if advice and jax.process_index() == 0:
    log(advice)
  if jax.process_index() == 0:
    checkpoints.write_atomically(os.path.join(workdir, "config.json"), config.to_json_best_effort(
        indent=2) + "\n")
  mesh_config = sharding.MeshConfig(**config.mesh.to_dict())
  missing = [name for name in config.pipeline if name not in config.stages]
  if missing:
    raise ValueError(f"pipeline names stages {missing} that config.stages does not define "
                     f"(it has {sorted(config.stages.keys())})")
  # Every stage's section is checked before the first stage runs: a wrong field fails now, not
  # an hour in.
  typed = {name: typed_config(config.stages[name], f"stages.{name}") for name in config.pipeline}
  outputs: dict[str, str] = {}
  results: dict[str, dict] = {}
  for name in config.pipeline:
    stage_cfg = typed[name]
    directory = os.path.join(workdir, name)
    finished = common.read_metrics(directory)
    if finished is not None:
      log(f"[{name}] finished earlier; skipping")
      outputs[name] = directory
      results[name] = finished
      continue
    log(f"[{name}] running ({stage_cfg.kind})")
    os.makedirs(directory, exist_ok=True)
    ctx = common.StageContext(name=name, directory=directory, outputs=dict(outputs),
                              mesh_config=mesh_config, seed=config.seed)
    started = time.time()
    metrics = stage_module(stage_cfg.kind).run(stage_cfg, ctx)
    if metrics.get("preempted"):
      log(f"[{name}] stopped before the end; rerun the same command to resume")
      return results
    metrics.update(_throughput(directory, time.time() - started))
    if jax.process_index() == 0:
      common.write_metrics(directory, metrics)
    log(f"[{name}] done: " + json.dumps({k: v for k, v in metrics.items()
                                         if isinstance(v, (int, float))}, default=str)[:400])
    outputs[name] = directory
    results[name] = metrics
  if jax.process_index() == 0:
    path = report.write_report(workdir, list(config.pipeline))
    log(f"report: {path}")
  return results


def _throughput(directory: str, seconds: float) -> dict:
  """The stage's wall time (of the session that finished it) and its median training tokens/s
  over the logged steps (the first, which includes compilation, left out)."""
  rates = [row["tokens_per_second"] for row in metrics_io.read_rows(directory, "train")
           if "tokens_per_second" in row][1:]
  result = {"wall_seconds": round(seconds, 1)}
  if rates:
    result["train_tokens_per_second"] = round(statistics.median(rates), 1)
  return result


def evaluate_stage(config: ml_collections.ConfigDict, workdir: str, stage: str | None = None,
                   checkpoint: str | None = None) -> dict:
  """Runs one stage's evaluations on its output (or on `checkpoint`) without training."""
  evaluable = [n for n in config.pipeline
               if hasattr(stage_module(config.stages[n].kind), "evaluate")]
  stage = stage or (evaluable[-1] if evaluable else None)
  if stage not in evaluable:
    raise ValueError(f"stage {stage!r} has no evaluations; stages that do: {evaluable}")
  index = list(config.pipeline).index(stage)
  outputs = {name: os.path.join(workdir, name) for name in config.pipeline[:index]
             if os.path.isdir(os.path.join(workdir, name))}
  ctx = common.StageContext(name=stage, directory=os.path.join(workdir, stage), outputs=outputs,
                            mesh_config=sharding.MeshConfig(**config.mesh.to_dict()),
                            seed=config.seed)
  return stage_module(config.stages[stage].kind).evaluate(
      typed_config(config.stages[stage], f"stages.{stage}"), ctx, checkpoint or ctx.directory)
