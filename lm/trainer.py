"""The train step and the loop every stage runs on.

A stage supplies `loss_fn(params, batch, rng) -> (loss, metrics)` (metrics carry `weight`, the
number of counted tokens or pairs, so micro-batches combine exactly), an optax optimizer, and
its data. The trainer owns the rest: the jitted, sharded, donated step with gradient accumulation
and a skip of non-finite updates; evaluation; metrics to the console, TensorBoard and a JSONL
file; Orbax checkpoints of everything needed to resume exactly (params, optimizer state, step,
RNG, the data iterator's position); and a clean save-and-exit on SIGTERM (TPU preemption).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from lm import checkpoints, hardware, sharding

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long and how the loop runs. `batch_size` is global, in sequences per optimizer step."""

  steps: int
  batch_size: int
  grad_accum: int = 1
  log_every: int = 10
  eval_every: int = 0  # 0: evaluate only at the end
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  max_nonfinite_in_a_row: int = 10
  seed: int = 0

  def __post_init__(self):
    if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
      raise ValueError(f"steps, batch_size and grad_accum must be positive: {self}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                       f"grad_accum={self.grad_accum}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything that changes during training. rng is a raw uint32 key, so it checkpoints as data."""

  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  nonfinite_in_a_row: jax.Array
  nonfinite_total: jax.Array


class DataIterator(Protocol):
  """What the loop needs from the data: batches of numpy arrays, and a resumable position."""

  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class NonFiniteLossError(RuntimeError):
  pass


def _micro_batches(batch: dict, grad_accum: int) -> dict:
  """[B, ...] -> [A, B/A, ...], taking every A-th row so each device keeps its own rows."""
  def split(x):
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None, grad_accum: int = 1):
  """A pure `(state, batch) -> (state, metrics)`; jit it with `Trainer.compile_step`."""

  def step_fn(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, inputs):
      index, micro = inputs
      grads_sum, metric_sums, weight_sum = carry
      (_, metrics), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
      weight = metrics["weight"].astype(jnp.float32)
      grads_sum = jax.tree.map(lambda g, s: s + g.astype(jnp.float32) * weight, grads, grads_sum)
      metric_sums = jax.tree.map(lambda m, s: s + m.astype(jnp.float32) * weight,
                                 {k: v for k, v in metrics.items() if k != "weight"}, metric_sums)
      return (grads_sum, metric_sums, weight_sum + weight), None

    micro = _micro_batches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(lambda: loss_fn(state.params, first, rng)[1])
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
             {k: jnp.zeros((), jnp.float32) for k in metric_shapes if k != "weight"},
             jnp.zeros((), jnp.float32))
    (grads_sum, metric_sums, weight), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum), micro))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads_sum)
    metrics = {k: v / denom for k, v in metric_sums.items()}

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(grad_norm) & jnp.all(
        jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    # A non-finite step leaves params and optimizer state as they were; it is counted instead.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa
    new_state = TrainState(
        params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1, rng=state.rng,
        nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics.update(
        grad_norm=grad_norm, param_norm=optax.tree.norm(state.params),
        update_norm=optax.tree.norm(updates), weight=weight,
        finite=finite.astype(jnp.float32),
    )
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return new_state, metrics

  return step_fn


class Trainer:
  """Holds the compiled step for one stage: mesh, shardings, optimizer and loss."""

  def __init__(self, *, loss_fn: LossFn, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule | None, cfg: TrainConfig, mesh: jax.sharding.Mesh,
               param_shardings: Any, rules: sharding.Rules = sharding.DEFAULT_RULES):
    self.cfg, self.mesh, self.rules = cfg, mesh, rules
    self.loss_fn, self.optimizer, self.schedule = loss_fn, optimizer, schedule
    self.param_shardings = param_shardings
    self._step_fn = make_train_step(loss_fn, optimizer, schedule, cfg.grad_accum)
    self._compiled = None

  # -- shapes and shardings -------------------------------------------------------------------

  def state_shardings(self, abstract_params: Any) -> TrainState:
    replicated = NamedSharding(self.mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        self.optimizer, lambda _, s: s, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(self.param_shardings, opt_shardings, replicated, replicated, replicated,
                      replicated)

  def abstract_state(self, abstract_params: Any) -> TrainState:
    """ShapeDtypeStructs with shardings of the whole TrainState: restore and AOT targets."""
    shapes = jax.eval_shape(lambda p: self._fresh_state(p), abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, self.state_shardings(abstract_params))

  def _fresh_state(self, params) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params, self.optimizer.init(params), zero,
                      jax.random.PRNGKey(self.cfg.seed), zero, zero)

  def init_state(self, params: Any) -> TrainState:
    """A fresh TrainState around `params`, the optimizer state created on its shardings."""
    shardings = self.state_shardings(jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params))
    with jax.set_mesh(self.mesh):
      return jax.jit(self._fresh_state, out_shardings=shardings)(params)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return sharding.data_sharding(self.mesh, ndim, self.rules)

  # -- the step ----------------------------------------------------------------------------------

  def jit_step(self, state_shardings: TrainState, batch_example: dict):
    batch_shardings = jax.tree.map(lambda x: self.batch_sharding(np.ndim(x)), batch_example)
    return jax.jit(self._step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, NamedSharding(self.mesh, PartitionSpec())),
                   donate_argnums=0)

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    if self._compiled is None:
      shardings = jax.tree.map(lambda x: x.sharding, state)
      self._compiled = self.jit_step(shardings, batch)
    with jax.set_mesh(self.mesh), sharding.use_rules(self.rules):
      return self._compiled(state, self.put_batch(batch))

  def process_rows(self, global_batch_size: int) -> tuple[int, int]:
    """[start, stop) of the global batch rows this process feeds (multi-host data sharding)."""
    indices = self.batch_sharding(1).addressable_devices_indices_map((global_batch_size,))
    starts = [index[0].start or 0 for index in indices.values()]
    stops = [global_batch_size if index[0].stop is None else index[0].stop
             for index in indices.values()]
    start, stop = min(starts), max(stops)
    if (stop - start) * jax.process_count() != global_batch_size:
      raise ValueError(f"this process's devices hold rows [{start}, {stop}) of a batch of "
                       f"{global_batch_size}, not a contiguous 1/{jax.process_count()} share; "
                       "order the mesh so each host owns a block of the batch axes")
    return start, stop

  def put_batch(self, batch: dict) -> dict:
    """Numpy batch (this process's rows) -> global arrays sharded over the data axes."""
    def put(x):
      x = np.asarray(x)
      target = self.batch_sharding(x.ndim)
      if jax.process_count() == 1:
        return jax.device_put(x, target)
      global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
      return jax.make_array_from_process_local_data(target, x, global_shape)
    return jax.tree.map(put, batch)


def check_workdir_writable(workdir: str) -> None:
  """Fails before any compute if outputs could not be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable: {e.strerror}") from e


def run(trainer: Trainer, *, params: Callable[[], Any] | Any, data: DataIterator,
        workdir: str, evaluate: Callable[[Any], dict] | None = None,
        tokens_per_step: int = 0, flops_per_token: float = 0.0,
        log: Callable[[str], None] = print) -> dict:
  """Trains to `cfg.steps`, resuming from workdir/checkpoints if a run was interrupted.

  Args:
    params: the initial params, or a function returning them (only called on a fresh start).
    data: the training batches; its position is checkpointed with the model.
    evaluate: params -> metrics, run every `eval_every` steps and at the end.
    tokens_per_step, flops_per_token: for the tokens/s and MFU figures in the progress line.

  Returns:
    The final evaluation metrics (and `preempted: True` if stopped by SIGTERM).
  """
  cfg = trainer.cfg
  check_workdir_writable(workdir)
  from lm import metrics_io  # noqa: the TensorBoard writer is only needed here

  manager = checkpoints.Manager(workdir, max_to_keep=cfg.keep_checkpoints,
                                async_save=cfg.async_checkpoints)
  state = _restore_or_init(trainer, manager, params, data, log)
  start = int(state.step)
  writer = metrics_io.MetricsWriter(workdir, resume_step=start)
  stop = _PreemptionFlag()
  meter = _Throughput(tokens_per_step, flops_per_token, cfg.steps, start)
  final: dict = {}
  try:
    for step in range(start, cfg.steps):
      if stop.requested:
        _save(manager, state, data, force=True)
        manager.wait()
        log(f"SIGTERM: saved step {step} and stopped; rerun the same command to resume")
        return {"preempted": True, "step": step}
      state, metrics = trainer.step(state, next(data))
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        streak = int(state.nonfinite_in_a_row)
        host["nonfinite_total"] = float(state.nonfinite_total)
        line = meter.line(done, host)
        writer.write(done, host, prefix="train")
        log(line)
        if streak >= cfg.max_nonfinite_in_a_row:
          raise NonFiniteLossError(
              f"{streak} steps in a row had a non-finite loss or gradient (up to step {done}); "
              "the updates were skipped. Lower the learning rate or check the data.")
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps and evaluate:
        writer.write(done, evaluate(state.params), prefix="eval")
      if done % cfg.checkpoint_every == 0 and done != cfg.steps:
        _save(manager, state, data)
    if int(state.step) == cfg.steps and cfg.steps not in manager.all_steps():
      _save(manager, state, data, force=True)
    manager.wait()
    if evaluate is not None:
      final = evaluate(state.params)
      writer.write(int(state.step), final, prefix="eval")
    final["nonfinite_steps"] = int(state.nonfinite_total)
    return final
  finally:
    stop.restore()
    writer.close()
    manager.close()


def _save(manager: checkpoints.Manager, state: TrainState, data: DataIterator, force=False):
  extra = {"step": state.step, "rng": state.rng, "nonfinite_in_a_row": state.nonfinite_in_a_row,
           "nonfinite_total": state.nonfinite_total}
  manager.save(int(state.step), state.params, state.opt_state, extra,
               data={"iterator": json.dumps(data.get_state(), default=_jsonable)}, force=force)


def _jsonable(value):
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, bytes):
    return value.decode("latin-1")
  raise TypeError(f"cannot checkpoint data iterator state of type {type(value).__name__}")


def _restore_or_init(trainer: Trainer, manager: checkpoints.Manager, params, data, log):
  """The newest checkpoint that restores (a damaged one falls back to the one before), else a
  fresh state from `params`."""
  steps = manager.all_steps()
  if steps:
    shapes = jax.eval_shape(params) if callable(params) else params
    abstract_params = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), shapes,
        trainer.param_shardings)
    target = trainer.abstract_state(abstract_params)
    extra_target = {"step": target.step, "rng": target.rng,
                    "nonfinite_in_a_row": target.nonfinite_in_a_row,
                    "nonfinite_total": target.nonfinite_total}
  for step in reversed(steps):
    try:
      restored = manager.restore(step, target.params, target.opt_state, extra_target, data=True)
    except Exception as e:  # noqa: BLE001  (any damage to the files shows up differently)
      log(f"WARNING: checkpoint step {step} could not be restored ({type(e).__name__}: "
          f"{str(e)[:200]}); trying the previous one")
      continue
    data.set_state(json.loads(restored["data"]["iterator"]))
    extra = restored["extra"]
    log(f"resumed from step {step}")
    return TrainState(restored["params"], restored["opt_state"], extra["step"], extra["rng"],
                      extra["nonfinite_in_a_row"], extra["nonfinite_total"])
  if steps:
    log("WARNING: no checkpoint could be restored; starting from scratch")
  return trainer.init_state(params() if callable(params) else params)


class _PreemptionFlag:
  """Turns SIGTERM into a flag the loop checks between steps (the main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      pass

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Throughput:
  """The progress line: step, loss, tokens/s, MFU estimate, ETA."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, total: int, start: int):
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.total, self.last_step, self.last_time = total, start, time.perf_counter()
    self.peak = hardware.peak_flops_per_device() * jax.device_count()

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    steps = max(step - self.last_step, 1)
    seconds_per_step = (now - self.last_time) / steps
    self.last_step, self.last_time = step, now
    parts = [f"step {step}/{self.total}", f"loss {metrics.get('loss', math.nan):.4f}"]
    if self.tokens_per_step:
      tokens_per_second = self.tokens_per_step / seconds_per_step
      metrics["tokens_per_second"] = tokens_per_second
      parts.append(f"{tokens_per_second:,.0f} tok/s")
      if self.flops_per_token and self.peak:
        mfu = tokens_per_second * self.flops_per_token / self.peak
        metrics["mfu"] = mfu
        parts.append(f"MFU {100 * mfu:.1f}%")
    eta = seconds_per_step * (self.total - step)
    parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    return " | ".join(parts)
