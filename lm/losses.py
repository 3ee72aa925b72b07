"""Losses as plain functions of arrays (no Flax): each returns a scalar and a dict of metrics.

Shapes: B batch, T positions, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_logprobs(logits: jax.Array, targets: jax.Array, log_z: jax.Array | None = None
                   ) -> jax.Array:
  """log p(target) at each position: logits [B, T, V], targets [B, T] -> [B, T] float32.

  `log_z` (logsumexp of the logits over V) may be passed when the caller has it already.
  """
  logits = logits.astype(jnp.float32)
  if log_z is None:
    log_z = jax.nn.logsumexp(logits, axis=-1)
  return _target_logits(logits, targets) - log_z


def _target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [B, T, V] read at targets [B, T] -> [B, T]."""
  return jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits: jax.Array) -> jax.Array:
  """Entropy (nats) of the next-token distribution at each position: [B, T, V] -> [B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


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
    the number of counted positions, so callers can combine micro-batches exactly. `accuracy` is
    the share of counted positions whose target has the largest logit (a tie for it counts).
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = _target_logits(logits, targets)
  nll = log_z - target_logits
  weight = jnp.sum(mask)
  denom = jnp.maximum(weight, 1.0)
  loss = jnp.sum(nll * mask) / denom
  z_term = jnp.sum(jnp.square(log_z) * mask) / denom
  # The target is counted right when no logit is above its own: a plain max, which XLA:CPU
  # runs far faster than argmax's reduction over value-index pairs (0.2-0.3 s of bench-50M's
  # 4096 x 32000 head, fwd+bwd, on 2 cores). Unlike argmax it counts a target tied for the top.
  correct = (target_logits >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  metrics = {"loss": loss, "z_loss": z_term, "accuracy": jnp.sum(correct * mask) / denom,
             "weight": weight}
  return loss + z_loss * z_term, metrics


# ---------------------------------------------------------------------------------------------
# Reward models (LLAMA2.md §6.3).

# The four preference levels, most separable first, spelled as the data readers spell them: must
# equal data_pipelines.preferences.RATINGS (a test pins it; lm does not import data_pipelines).
RATINGS = ("significantly better", "better", "slightly better", "negligibly better or unsure")
UNRATED = -1  # the rating id the data readers store for unrated pairs (e.g. HH-RLHF) and padding

# Table 27. The paper does not say which table the final RMs used, so the table is a config choice.
RATING_MARGINS: dict[str, dict[str, float]] = {
    "small": dict(zip(RATINGS, (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
    "none": dict.fromkeys(RATINGS, 0.0),
}


def margins_for(ratings, table: str | dict[str, float]) -> np.ndarray:
  """Maps preference ratings to the margins m(r) of Eq. 2 (on the host, before the batch is sent).

  Args:
    ratings: any shape, either rating names from RATINGS or integer ids into RATINGS (as stored by
      data_pipelines.preferences.pack_pairs). The id UNRATED (-1) gets margin 0: with no rating
      Eq. 2 falls back to Eq. 1, and padding pairs carry -1 too.
    table: a key of RATING_MARGINS ("small", "large", "none") or a {rating name: margin} mapping.

  Returns:
    float32 array of ratings' shape.

  Raises:
    ValueError: naming an unknown table, an unknown rating name or an out-of-range id.
  """
  if isinstance(table, str):
    if table not in RATING_MARGINS:
      raise ValueError(f"unknown margin table {table!r}; expected one of {sorted(RATING_MARGINS)}")
    table = RATING_MARGINS[table]
  missing = [r for r in RATINGS if r not in table]
  if missing:
    raise ValueError(f"margin table has no entry for ratings {missing}")
  by_id = np.array([table[r] for r in RATINGS] + [0.0], np.float32)  # [-1] indexes UNRATED's 0
  ratings = np.asarray(ratings)
  if ratings.dtype.kind in "USO":
    names = {name: i for i, name in enumerate(RATINGS)}
    bad = sorted({str(r) for r in ratings.ravel() if r not in names})
    if bad:
      raise ValueError(f"unknown rating(s) {bad}; expected one of {RATINGS}")
    ids = np.vectorize(names.__getitem__, otypes=[np.int64])(ratings)
  elif ratings.dtype.kind in "iu":
    bad = sorted({int(r) for r in ratings.ravel() if not UNRATED <= r < len(RATINGS)})
    if bad:
      raise ValueError(f"unknown rating id(s) {bad}; expected {UNRATED} (unrated) or an index "
                       f"into {RATINGS}")
    ids = ratings
  else:
    raise ValueError(f"ratings must be names or integer ids, got dtype {ratings.dtype}")
  return by_id[ids]


def _weighted_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(x * w) / sum(w), 0 when nothing counts; where() keeps NaN/inf at w=0 entries out."""
  total = jnp.sum(weights)
  return jnp.sum(jnp.where(weights > 0, x, 0.0) * weights) / jnp.where(total > 0, total, 1.0)


def ranking_loss(chosen_scores: jax.Array, rejected_scores: jax.Array, margins=0.0,
                 mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Pairwise ranking loss with a margin (LLAMA2.md Eq. 2): -log sigmoid(r_c - r_r - m(r)).

  Args:
    chosen_scores, rejected_scores: [P] raw (pre-sigmoid) RM scores r_c and r_r; any shape
      works, every entry is one pair.
    margins: [P] or scalar, m(r) from margins_for (0 gives Eq. 1).
    mask: optional [P] weights, 1 for a real pair and 0 for padding (fractional weights work).

  Returns:
    (weighted mean loss, {"loss", "accuracy", "weight"}): accuracy is the share of counted pairs
    with r_c > r_r (ties count as wrong); weight is the number (sum of weights) of counted pairs.
  """
  chosen = chosen_scores.astype(jnp.float32)
  rejected = rejected_scores.astype(jnp.float32)
  mask = jnp.ones_like(chosen) if mask is None else jnp.broadcast_to(
      jnp.asarray(mask, jnp.float32), chosen.shape)
  diff = chosen - rejected
  # log_sigmoid is stable for large |x| where log(sigmoid(x)) would underflow to log(0).
  nll = -jax.nn.log_sigmoid(diff - jnp.asarray(margins, jnp.float32))
  loss = _weighted_mean(nll, mask)
  metrics = {"loss": loss, "accuracy": _weighted_mean((diff > 0).astype(jnp.float32), mask),
             "weight": jnp.sum(mask)}
  return loss, metrics


def safe_label_loss(scores: jax.Array, is_safe: jax.Array,
                    mask: jax.Array) -> tuple[jax.Array, dict]:
  """The safety RM's auxiliary term: binary cross-entropy of sigmoid(score) against the label.

  The paper (A.3.4, Table 29) gives no formula; this is LLAMA2.md §6.3's suggestion, which makes
  sigmoid(score) = 0.5 the safe/unsafe threshold. Its weight in the total loss is the caller's.

  Args:
    scores: [P] raw RM scores of single responses (e.g. chosen and rejected ones concatenated).
    is_safe: [P] int, 1 safe, 0 unsafe, -1 unlabelled (pack_pairs' convention); unlabelled
      entries never count, whatever the mask says, so -1 can't be mistaken for a label.
    mask: [P] weights, 1 where the response counts.

  Returns:
    (weighted mean BCE, {"loss", "accuracy", "unsafe_recall", "weight"}): accuracy at the 0.5
    threshold; unsafe_recall is the share of unsafe responses scored below 0.5 (Table 29's
    "unsafe-response recall"); weight is the number of counted responses.
  """
  scores = scores.astype(jnp.float32)
  is_safe = jnp.asarray(is_safe)
  mask = jnp.asarray(mask, jnp.float32) * (is_safe >= 0)
  label = (is_safe > 0).astype(jnp.float32)
  nll = -(label * jax.nn.log_sigmoid(scores) + (1.0 - label) * jax.nn.log_sigmoid(-scores))
  loss = _weighted_mean(nll, mask)
  correct = ((scores > 0) == (label > 0)).astype(jnp.float32)
  metrics = {"loss": loss, "accuracy": _weighted_mean(correct, mask),
             "unsafe_recall": _weighted_mean((scores < 0).astype(jnp.float32),
                                             mask * (1.0 - label)),
             "weight": jnp.sum(mask)}
  return loss, metrics
