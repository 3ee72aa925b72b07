"""The training loop in pieces: a `Session` restores or initialises the state, runs steps, logs,
evaluates, checkpoints and honours preemption; `run` is the plain loop over a data iterator.

A stage with its own outer loop (PPO: rollout -> score -> update) opens a Session and calls
`session.step(batch, frozen)` as often as an iteration needs, then `session.checkpoint()` at the
iteration's end, where its own position (`data.get_state()`: prompt order, iteration count) is
consistent. Checkpoints hold everything needed to resume exactly: the trainable trees, optimizer
state, step, RNG and the data position; a run killed at any moment restarts from the last one and
draws the same curve.
"""

from __future__ import annotations

import json
import math
import signal
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np

from lm import checkpoints, hardware
from lm.trainer.core import Trainer, check_workdir_writable
from lm.trainer.step import TrainState


class Stateful(Protocol):
  """A resumable position: the data iterator's, or a stage's own outer loop's."""

  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class DataIterator(Stateful, Protocol):
  """What `run` needs from the data: batches of numpy arrays, and a resumable position."""

  def __next__(self) -> dict[str, np.ndarray]: ...


class NonFiniteLossError(RuntimeError):
  pass


class Session:
  """One stage's training run; use as a context manager.

  Args:
    params: the initial trainable tree, or a function returning it (called on a fresh start only).
    data: the position saved with every checkpoint and restored on resume.
    evaluate: trainable -> metrics, every `eval_every` steps and in `finish`.
    tokens_per_step, flops_per_token: for the tokens/s and MFU figures in the progress line.
  """

  def __init__(self, trainer: Trainer, workdir: str, *, params: Callable[[], Any] | Any,
               data: Stateful, evaluate: Callable[[Any], dict] | None = None,
               tokens_per_step: int = 0, flops_per_token: float = 0.0,
               log: Callable[[str], None] = print):
    self.trainer, self.cfg, self.workdir = trainer, trainer.cfg, workdir
    self._params, self.data, self.evaluate, self.log = params, data, evaluate, log
    self._meter_args = (tokens_per_step, flops_per_token)

  def __enter__(self) -> Session:
    check_workdir_writable(self.workdir)
    from lm import metrics_io  # noqa: the TensorBoard writer is only needed here
    self.manager = checkpoints.Manager(self.workdir, max_to_keep=self.cfg.keep_checkpoints,
                                       async_save=self.cfg.async_checkpoints)
    try:
      self.state = _restore_or_init(self.trainer, self.manager, self._params, self.data, self.log)
    except BaseException:
      self.manager.close()
      raise
    self.start_step = self.step_count
    self.writer = metrics_io.MetricsWriter(self.workdir, resume_step=self.start_step)
    self._preemption = _PreemptionFlag()
    self._meter = _Throughput(*self._meter_args, self.cfg.steps, self.start_step)
    return self

  def __exit__(self, *exc):
    self._preemption.restore()
    self.writer.close()
    self.manager.close()

  @property
  def step_count(self) -> int:
    return int(self.state.step)

  @property
  def finished(self) -> bool:
    return self.step_count >= self.cfg.steps

  @property
  def preempted(self) -> bool:
    """SIGTERM arrived (TPU preemption): the owner of the loop should `stop()`."""
    return self._preemption.requested

  def step(self, batch: dict, frozen: Any = None, extra_metrics: dict | None = None) -> dict:
    """One optimizer step; logs on the `log_every` cadence (with `extra_metrics`, e.g. a
    rollout's timings) and evaluates on `eval_every`. Returns the step's metrics (on device)."""
    self.state, metrics = self.trainer.step(self.state, batch, frozen)
    done = self.step_count
    if done % self.cfg.log_every == 0 or done == self.cfg.steps:
      self.log_metrics(done, metrics, extra_metrics)
    if (self.cfg.eval_every and done % self.cfg.eval_every == 0 and done != self.cfg.steps
        and self.evaluate):
      self.writer.write(done, self.evaluate(self.state.params), prefix="eval")
    return metrics

  def log_metrics(self, done: int, metrics: dict, extra: dict | None = None) -> None:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    host.update(extra or {})
    streak = int(self.state.nonfinite_in_a_row)
    host["nonfinite_total"] = float(self.state.nonfinite_total)
    line = self._meter.line(done, host)
    self.writer.write(done, host, prefix="train")
    self.log(line)
    if streak >= self.cfg.max_nonfinite_in_a_row:
      raise NonFiniteLossError(
          f"{streak} steps in a row had a non-finite loss or gradient (up to step {done}); "
          "the updates were skipped. Lower the learning rate or check the data.")

  def maybe_checkpoint(self) -> None:
    """Saves on the `checkpoint_every` cadence (the final step is saved by `finish`)."""
    done = self.step_count
    if done % self.cfg.checkpoint_every == 0 and done != self.cfg.steps:
      self.checkpoint()

  def checkpoint(self, force: bool = False) -> None:
    if force or self.step_count not in self.manager.all_steps():
      _save(self.manager, self.state, self.data, force=force)

  def stop(self) -> dict:
    """Saves now and returns the preempted marker the pipeline understands."""
    self.checkpoint(force=True)
    self.manager.wait()
    self.log(f"SIGTERM: saved step {self.step_count} and stopped; rerun the same command to "
             "resume")
    return {"preempted": True, "step": self.step_count}

  def finish(self) -> dict:
    """Saves the final state and returns the final evaluation."""
    if self.finished and self.cfg.steps not in self.manager.all_steps():
      _save(self.manager, self.state, self.data, force=True)
    self.manager.wait()
    final: dict = {}
    if self.evaluate is not None:
      final = self.evaluate(self.state.params)
      self.writer.write(self.step_count, final, prefix="eval")
    final["nonfinite_steps"] = int(self.state.nonfinite_total)
    return final


def run(trainer: Trainer, *, params: Callable[[], Any] | Any, data: DataIterator,
        workdir: str, evaluate: Callable[[Any], dict] | None = None,
        tokens_per_step: int = 0, flops_per_token: float = 0.0,
        log: Callable[[str], None] = print, frozen: Any = None) -> dict:
  """Trains to `cfg.steps` on `data`, resuming from workdir/checkpoints if a run was interrupted.

  Returns the final evaluation metrics (and `preempted: True` if stopped by SIGTERM).
  """
  with Session(trainer, workdir, params=params, data=data, evaluate=evaluate,
               tokens_per_step=tokens_per_step, flops_per_token=flops_per_token,
               log=log) as session:
    while not session.finished:
      if session.preempted:
        return session.stop()
      session.step(next(data), frozen)
      session.maybe_checkpoint()
    return session.finish()


def _save(manager: checkpoints.Manager, state: TrainState, data: Stateful, force=False):
  extra = {"step": state.step, "rng": state.rng, "nonfinite_in_a_row": state.nonfinite_in_a_row,
           "nonfinite_total": state.nonfinite_total}
  manager.save(int(state.step), state.params, state.opt_state, extra,
               data={"iterator": _data_state(data)}, force=force)


PER_PROCESS = "__per_process__"


def _data_state(data: Stateful) -> str:
  """The data position as JSON: in a multi-process run, every process's, gathered (each host
  reads its own shard, so positions differ, and Orbax writes JSON from the primary host only)."""
  state = json.dumps(data.get_state(), default=_jsonable)
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils  # noqa: only multi-process runs need it
  raw = np.frombuffer(state.encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size]))).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return json.dumps({PER_PROCESS: [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]})


def _set_data_state(data: Stateful, saved: str) -> None:
  """Restores this process's own position from what `_data_state` wrote."""
  state = json.loads(saved)
  if isinstance(state, dict) and PER_PROCESS in state:
    states = state[PER_PROCESS]
    if len(states) != jax.process_count():
      raise ValueError(f"the checkpoint holds the data positions of {len(states)} processes; "
                       f"this run has {jax.process_count()}: resume with the same process count")
    state = json.loads(states[jax.process_index()])
  data.set_state(state)


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
    target = trainer.abstract_state(trainer.abstract_params(shapes))
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
    _set_data_state(data, restored["data"]["iterator"])
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
