"""The Trainer: one stage's compiled step with its mesh, shardings, optimizer and loss.

It owns shapes and placement (the state's shardings, the batch's, this host's rows of a global
batch) and the jitted, donated step; the loop around it is in `loop.py`, so a stage that drives
its own outer loop (rollout -> score -> update) reuses the same step and checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lm import sharding
from lm.trainer.step import LossFn, TrainState, make_train_step


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


class Trainer:
  """Holds the compiled step for one stage: mesh, shardings, optimizer and loss.

  Args:
    loss_fn: `(trainable, frozen, batch, rng) -> (loss, metrics)`, see `step.py`.
    param_shardings: NamedShardings shaped like the trainable tree.
    rules: the plan the batch is laid out by (its `batch` rule).
  """

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

  def abstract_params(self, params: Any) -> Any:
    """ShapeDtypeStructs of the trainable tree on its shardings (params may be abstract)."""
    return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        params, self.param_shardings)

  def _fresh_state(self, params) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params, self.optimizer.init(params), zero,
                      jax.random.PRNGKey(self.cfg.seed), zero, zero)

  def init_state(self, params: Any) -> TrainState:
    """A fresh TrainState around `params`, the optimizer state created on its shardings."""
    shardings = self.state_shardings(
        jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params))
    with jax.set_mesh(self.mesh):
      return jax.jit(self._fresh_state, out_shardings=shardings)(params)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return sharding.data_sharding(self.mesh, ndim, self.rules)

  # -- the step ----------------------------------------------------------------------------------

  def jit_step(self, state_shardings: TrainState, batch_example: dict, frozen_example: Any = None):
    """The jitted step for these shardings; `frozen_example` (arrays or ShapeDtypeStructs with
    shardings) fixes where the frozen trees live."""
    batch_shardings = jax.tree.map(lambda x: self.batch_sharding(np.ndim(x)), batch_example)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen_example)
    return jax.jit(self._step_fn, in_shardings=(state_shardings, batch_shardings,
                                                frozen_shardings),
                   out_shardings=(state_shardings, NamedSharding(self.mesh, PartitionSpec())),
                   donate_argnums=0)

  def step(self, state: TrainState, batch: dict, frozen: Any = None
           ) -> tuple[TrainState, dict]:
    """One optimizer step on a numpy batch of this process's rows; `frozen` as in loss_fn."""
    if self._compiled is None:
      self._compiled = self.jit_step(jax.tree.map(lambda x: x.sharding, state), batch, frozen)
    with jax.set_mesh(self.mesh):
      return self._compiled(state, self.put_batch(batch), frozen)

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
      if isinstance(x, jax.Array):
        return x  # already global (e.g. a rollout produced on the mesh)
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
