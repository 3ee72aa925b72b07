"""The language-modelling loss (lm/losses.py `next_token_loss`) against optax and float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import losses

# The loss and z-term are means of at most B*T = 60 terms, each a logsumexp over V = 50 fp32
# logits of O(1): ~1e-6 relative error against float64; 1e-5 leaves a 10x margin.
RTOL = 1e-5
B, T, V = 5, 12, 50


def batch(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (B, T, V)).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  mask = (rng.random((B, T)) < 0.6).astype(np.float32)
  mask[0] = 0  # a row with nothing counted
  mask[1] = 1
  return logits, targets, mask


def test_loss_and_z_term_match_optax_and_float64():
  logits, targets, mask = batch()
  loss, metrics = jax.jit(losses.next_token_loss, static_argnums=3)(logits, targets, mask, 0.1)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  nll = float(np.sum(np.asarray(per_token) * mask) / mask.sum())
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  z_term = float(np.sum(log_z ** 2 * mask) / mask.sum())
  np.testing.assert_allclose([metrics["loss"], metrics["z_loss"], loss],
                             [nll, z_term, nll + 0.1 * z_term], rtol=RTOL)
  assert float(metrics["weight"]) == mask.sum()

  def optax_loss(x):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * mask) / mask.sum()

  ours = jax.grad(lambda x: losses.next_token_loss(x, targets, mask)[0])(logits)
  # Gradients are softmax - onehot, O(1/V) each: the same 1e-5 relative plus an absolute floor
  # for the entries of masked positions, which are exactly 0 on both sides.
  np.testing.assert_allclose(ours, jax.grad(optax_loss)(logits), rtol=RTOL, atol=1e-7)


def test_accuracy_is_the_share_of_counted_targets_with_the_top_logit():
  logits, targets, mask = batch(1)
  # Plant right answers: about 40% of the positions get their target as the largest logit.
  rng = np.random.default_rng(2)
  planted = rng.random((B, T)) < 0.4
  for b, t in zip(*np.nonzero(planted)):
    logits[b, t, targets[b, t]] = logits[b, t].max() + 1.0
  _, metrics = losses.next_token_loss(logits, targets, mask)
  right = sum(mask[b, t] * (np.argmax(logits[b, t]) == targets[b, t])
              for b in range(B) for t in range(T))
  assert 0.15 < right / mask.sum() < 0.7  # the planting worked, and chance (1/V) would give ~0.02
  np.testing.assert_allclose(metrics["accuracy"], right / mask.sum(), rtol=RTOL)


def test_a_target_tied_for_the_top_logit_counts_as_right():
  logits = np.zeros((1, 1, V), np.float32)
  logits[0, 0, [3, 7]] = 5.0  # argmax would say 3
  _, metrics = losses.next_token_loss(logits, np.array([[7]], np.int32), np.ones((1, 1)))
  assert float(metrics["accuracy"]) == 1.0
  _, metrics = losses.next_token_loss(logits, np.array([[8]], np.int32), np.ones((1, 1)))
  assert float(metrics["accuracy"]) == 0.0
