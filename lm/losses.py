"""Losses as plain functions of arrays (no Flax): each returns a scalar and a dict of metrics.

Shapes: B batch, T positions, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                    z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Masked mean cross-entropy of next-token prediction.

  Args:
    logits: [B, T, V] (upcast to float32 here).
    targets: [B, T] int, the token that should follow each position.
    mask: [B, T], 1 where the position counts (answer tokens in SFT, real tokens in pretraining).
    z_loss: weight of the auxiliary log(Z)^2 term that keeps the softmax normaliser near 1.

  Returns:
    (mean loss over counted positions, {"loss", "z_loss", "accuracy", "weight"}) where weight is
    the number of counted positions, so callers can combine micro-batches exactly.
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = log_z - target_logits
  weight = jnp.sum(mask)
  denom = jnp.maximum(weight, 1.0)
  loss = jnp.sum(nll * mask) / denom
  z_term = jnp.sum(jnp.square(log_z) * mask) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"loss": loss, "z_loss": z_term, "accuracy": jnp.sum(correct * mask) / denom,
             "weight": weight}
  return loss + z_loss * z_term, metrics
