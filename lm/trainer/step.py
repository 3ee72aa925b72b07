"""The train step: a pure `(state, batch, frozen) -> (state, metrics)` over any trainable tree.

`loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`. `trainable` is whatever the stage
trains (one model's params, or `{"policy": ..., "value": ...}` for PPO) and gets gradients and one
optimizer state over the whole tree; `frozen` (reference and reward models, or None) goes in
untouched and is never differentiated, donated or checkpointed. Metrics carry `weight`, the
number of counted tokens or pairs, so micro-batches combine exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything that changes during training. rng is a raw uint32 key, so it checkpoints as data.

  `params` is the trainable tree (any pytree); `opt_state` the optimizer's state over it.
  """

  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array
  nonfinite_in_a_row: jax.Array
  nonfinite_total: jax.Array


def _micro_batches(batch: dict, grad_accum: int) -> dict:
  """[B, ...] -> [A, B/A, ...], taking every A-th row so each device keeps its own rows."""
  def split(x):
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None, grad_accum: int = 1):
  """A pure `(state, batch, frozen) -> (state, metrics)`; the Trainer jits it."""

  def step_fn(state: TrainState, batch: dict, frozen: Any = None):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, inputs):
      index, micro = inputs
      grads_sum, metric_sums, weight_sum = carry
      (_, metrics), grads = grad_fn(state.params, frozen, micro, jax.random.fold_in(rng, index))
      weight = metrics["weight"].astype(jnp.float32)
      grads_sum = jax.tree.map(lambda g, s: s + g.astype(jnp.float32) * weight, grads, grads_sum)
      metric_sums = jax.tree.map(lambda m, s: s + m.astype(jnp.float32) * weight,
                                 {k: v for k, v in metrics.items() if k != "weight"}, metric_sums)
      return (grads_sum, metric_sums, weight_sum + weight), None

    micro = _micro_batches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(lambda: loss_fn(state.params, frozen, first, rng)[1])
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
      # Skipped steps leave optax's own count behind `step`: this is the rate it applies.
      metrics["learning_rate"] = schedule(state.step - state.nonfinite_total)
    return new_state, metrics

  return step_fn
