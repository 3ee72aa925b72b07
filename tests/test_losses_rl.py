"""Reward-model losses (lm/losses.py) and PPO pieces (lm/rl.py) against slow loop references.

Each reference below is written with Python loops over float64 numpy, one pair / token at a time,
straight from the formula in LLAMA2.md §6.3 / §7.3, so it shares no vectorised code with lm/.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_pipelines import preferences as prefs
from lm import losses, rl

# Fixed tolerances, never relaxed without discussion. The code under test runs in fp32 (machine
# eps 1.2e-7); every quantity here is a few dozen ops on O(1) values or a sum of at most B*T = 96
# terms, so its error stays within ~1e-6 relative of the float64 reference. 1e-5 relative leaves a
# 10x margin; 1e-6 absolute covers results that should be ~0 (a whitened mean, a tiny advantage),
# where relative error means nothing.
RTOL, ATOL = 1e-5, 1e-6
B, T = 8, 12


def close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL, atol=ATOL)


def ragged_mask(rng, b=B, t=T):
  """Answers of different lengths at different offsets: row 0 empty, row 1 the whole row, row 2
  one token at the very end, row 3 starting at 0, the rest random (start, length)."""
  mask = np.zeros((b, t), np.float32)
  mask[1, :] = 1
  mask[2, -1] = 1
  mask[3, :5] = 1
  for r in range(4, b):
    start = int(rng.integers(0, t))
    mask[r, start:start + int(rng.integers(1, t - start + 1))] = 1
  return mask


def answer_positions(mask_row):
  return [t for t in range(len(mask_row)) if mask_row[t] > 0]


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x):  # the two branches avoid exp overflow for |x| large
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------
# Reward models.

def test_ratings_are_the_data_readers_and_margins_are_table_27():
  assert losses.RATINGS == prefs.RATINGS and losses.UNRATED == prefs.UNRATED
  assert losses.RATING_MARGINS["small"] == {"significantly better": 1.0, "better": 2 / 3,
                                            "slightly better": 1 / 3,
                                            "negligibly better or unsure": 0.0}
  assert losses.RATING_MARGINS["large"] == {"significantly better": 3.0, "better": 2.0,
                                            "slightly better": 1.0,
                                            "negligibly better or unsure": 0.0}
  assert losses.RATING_MARGINS["none"] == dict.fromkeys(prefs.RATINGS, 0.0)


@pytest.mark.parametrize("table", ["small", "large", "none"])
def test_each_margin_applied_to_its_rating(table):
  expected = losses.RATING_MARGINS[table]
  names = np.array(list(prefs.RATINGS) * 2)
  ids = np.array([prefs.RATINGS.index(n) for n in names] + [prefs.UNRATED])
  close(losses.margins_for(names, table), [expected[n] for n in names])
  close(losses.margins_for(ids, table), [expected[n] for n in names] + [0.0])  # unrated: Eq. 1
  assert losses.margins_for(ids.reshape(3, 3), table).shape == (3, 3)  # pack_pairs' [N, P]
  # Each pair's loss uses its own rating's margin.
  chosen, rejected = np.linspace(-2, 2, 8), np.linspace(1, -1, 8)
  loss, _ = losses.ranking_loss(jnp.asarray(chosen, jnp.float32),
                                jnp.asarray(rejected, jnp.float32),
                                losses.margins_for(names, table))
  per_pair = [-log_sigmoid(c - r - expected[n]) for c, r, n in zip(chosen, rejected, names)]
  close(loss, sum(per_pair) / len(per_pair))


def test_margins_for_names_what_is_wrong():
  with pytest.raises(ValueError, match="'medium'"):
    losses.margins_for(["better"], "medium")
  with pytest.raises(ValueError, match="'much better'"):
    losses.margins_for(["better", "much better"], "small")
  with pytest.raises(ValueError, match=r"\[-2, 4\]"):
    losses.margins_for([0, 4, -2], "large")
  with pytest.raises(ValueError, match="slightly better"):
    losses.margins_for([0], {"significantly better": 1.0, "better": 0.5})
  with pytest.raises(ValueError, match="dtype"):
    losses.margins_for([0.5], "small")


def ref_ranking(chosen, rejected, margins, mask):
  loss = correct = weight = 0.0
  for c, r, m, w in zip(chosen, rejected, margins, mask):
    loss += w * -math.log(sigmoid(float(c) - float(r) - float(m)))
    correct += w * (c > r)
    weight += w
  return (loss / weight, correct / weight, weight) if weight else (0.0, 0.0, 0.0)


def test_ranking_loss_matches_loop_and_optax():
  rng = np.random.default_rng(0)
  p = 40
  chosen = rng.normal(0, 2, p).astype(np.float32)
  rejected = rng.normal(0, 2, p).astype(np.float32)
  margins = losses.margins_for(rng.integers(-1, 4, p), "large")
  mask = (rng.random(p) < 0.7).astype(np.float32)
  loss, m = jax.jit(losses.ranking_loss)(chosen, rejected, margins, mask)
  ref = ref_ranking(chosen, rejected, margins, mask)
  close([loss, m["loss"], m["accuracy"], m["weight"]], [ref[0], ref[0], ref[1], ref[2]])
  # -log sigmoid(x) is optax's sigmoid BCE with label 1.
  bce = optax.sigmoid_binary_cross_entropy(chosen - rejected - margins, np.ones(p, np.float32))
  close(loss, float(np.sum(np.asarray(bce) * mask) / mask.sum()))
  # No mask: every pair counts; padded pairs' values don't matter, even NaN.
  close(losses.ranking_loss(chosen, rejected, margins)[0], ref_ranking(chosen, rejected, margins,
                                                                       np.ones(p))[0])
  poisoned = np.where(mask > 0, chosen, np.nan).astype(np.float32)
  close(losses.ranking_loss(poisoned, rejected, margins, mask)[0], ref[0])


def test_ranking_loss_is_stable_and_empty_safe():
  big = jnp.array([60.0, -60.0], jnp.float32)
  loss, _ = losses.ranking_loss(big, -big)  # diffs of ±120: log(sigmoid) would give inf
  close(loss, (-log_sigmoid(120.0) - log_sigmoid(-120.0)) / 2)
  zeros = jnp.zeros(3)
  loss, m = losses.ranking_loss(zeros + 1, zeros, 0.0, zeros)
  assert float(loss) == 0.0 and float(m["weight"]) == 0.0 and float(m["accuracy"]) == 0.0
  grad = jax.grad(lambda c: losses.ranking_loss(c, zeros, 0.0, zeros)[0])(zeros)
  assert np.all(np.asarray(grad) == 0)


def test_safe_label_loss_matches_loop_and_optax():
  rng = np.random.default_rng(1)
  p = 50
  scores = rng.normal(0, 3, p).astype(np.float32)
  is_safe = rng.integers(-1, 2, p).astype(np.int32)  # -1 unlabelled never counts
  mask = (rng.random(p) < 0.8).astype(np.float32)
  loss, m = jax.jit(losses.safe_label_loss)(scores, is_safe, mask)
  total = correct = weight = caught = unsafe = 0.0
  for s, y, w in zip(scores, is_safe, mask):
    if w == 0 or y < 0:
      continue
    prob = sigmoid(float(s))
    total += -math.log(prob) if y == 1 else -math.log(1 - prob)
    correct += (prob > 0.5) == (y == 1)
    weight += 1
    unsafe += y == 0
    caught += y == 0 and prob < 0.5
  close([loss, m["accuracy"], m["unsafe_recall"], m["weight"]],
        [total / weight, correct / weight, caught / unsafe, weight])
  counted = mask * (is_safe >= 0)
  bce = optax.sigmoid_binary_cross_entropy(scores, (is_safe > 0).astype(np.float32))
  close(loss, float(np.sum(np.asarray(bce) * counted) / counted.sum()))
  loss, m = losses.safe_label_loss(scores, is_safe, np.zeros(p))
  assert float(loss) == 0.0 and float(m["weight"]) == 0.0


# ---------------------------------------------------------------------------------------------
# PPO (LLAMA2.md §7.3).

@pytest.mark.parametrize("is_safety", [False, True])
def test_safety_gate_at_and_around_the_threshold(is_safety):
  safety = np.array([0.1499, 0.15, 0.1501, 0.0, 0.9], np.float32)
  helpful = np.array([0.7, 0.8, 0.9, 0.6, 0.2], np.float32)
  got = rl.safety_gated_reward(helpful, safety, np.full(5, is_safety))
  # Loop reference: R_s if IS_SAFETY or R_s < 0.15 else R_h (0.15 itself is not below 0.15).
  ref = [s if is_safety or s < np.float32(0.15) else h for s, h in zip(safety, helpful)]
  expected = safety if is_safety else np.array([0.1499, 0.8, 0.9, 0.0, 0.2], np.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref, np.float32))
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_safety_gate_mixed_batch_and_custom_threshold():
  rng = np.random.default_rng(2)
  helpful, safety = rng.random((2, 64)).astype(np.float32)
  tag = rng.random(64) < 0.3
  got = np.asarray(jax.jit(rl.safety_gated_reward, static_argnums=3)(helpful, safety, tag, 0.5))
  for i in range(64):
    assert got[i] == (safety[i] if tag[i] or safety[i] < 0.5 else helpful[i])


def test_logit_inverts_sigmoid_and_stays_finite():
  p = np.array([0.0, 1e-9, 0.01, 0.3, 0.5, 0.77, 0.99, 1.0], np.float32)
  got = np.asarray(rl.logit(p, 1e-6))
  lo, hi = float(np.float32(1e-6)), float(np.float32(1 - 1e-6))  # the bounds as fp32 holds them
  ref = []
  for x in p:
    x = min(max(float(x), lo), hi)
    ref.append(math.log(x / (1 - x)))
  close(got, ref)
  # Both ends clip (0 and 1e-9 land on the same bound). Not exactly antisymmetric: fp32 can't hold
  # 1 - 1e-6 exactly, and the logit's slope there is 1e6, which the reference above accounts for.
  assert np.all(np.isfinite(got)) and got[0] == got[1]
  close(rl.logit(jax.nn.sigmoid(jnp.linspace(-5, 5, 11))), np.linspace(-5, 5, 11))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_masked_stats_and_leaves_padding_alone(shift_mean):
  rng = np.random.default_rng(3)
  x = rng.normal(3.0, 2.5, (B, T)).astype(np.float32)
  mask = ragged_mask(rng)
  got = np.asarray(jax.jit(rl.whiten, static_argnums=2)(x, mask, shift_mean))
  kept = [float(x[b, t]) for b in range(B) for t in range(T) if mask[b, t]]
  mean = sum(kept) / len(kept)
  std = math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))  # population std
  for b in range(B):
    for t in range(T):
      if mask[b, t]:
        ref = (x[b, t] - mean) / std + (0.0 if shift_mean else mean)
        close(got[b, t], ref)
      else:
        assert got[b, t] == x[b, t]  # masked-out entries are returned unchanged
  out = [float(got[b, t]) for b in range(B) for t in range(T) if mask[b, t]]
  out_mean = sum(out) / len(out)
  close(out_mean, 0.0 if shift_mean else mean)
  close(math.sqrt(sum((v - out_mean) ** 2 for v in out) / len(out)), 1.0)


def test_whiten_with_zero_or_one_counted_entry_is_finite():
  x = np.array([5.0, -2.0, 7.0], np.float32)
  np.testing.assert_array_equal(np.asarray(rl.whiten(x, np.zeros(3))), x)
  got = np.asarray(rl.whiten(x, np.array([0, 1, 0])))
  np.testing.assert_array_equal(got, [5.0, 0.0, 7.0])
  got = np.asarray(rl.whiten(x, np.array([0, 1, 0]), shift_mean=False))
  np.testing.assert_array_equal(got, x)
  grad = jax.grad(lambda v: jnp.sum(rl.whiten(v, jnp.zeros(3))))(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(grad)))


def rollout(seed):
  rng = np.random.default_rng(seed)
  mask = ragged_mask(rng)
  logp = np.log(rng.uniform(0.05, 1.0, (B, T))).astype(np.float32)
  ref_logp = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  # Padding log-probs are garbage by design: -inf must not leak through any mask.
  logp = np.where(mask > 0, logp, -np.inf).astype(np.float32)
  return rng, mask, logp, ref_logp


def test_kl_penalty_and_estimators():
  _, mask, logp, ref_logp = rollout(4)
  beta = 0.01
  pen = np.asarray(rl.kl_penalty(logp, ref_logp, mask, beta))
  k1 = k3 = 0.0
  n = 0
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        assert pen[b, t] == 0.0
        continue
      d = float(logp[b, t]) - float(ref_logp[b, t])
      close(pen[b, t], -beta * d)
      k1 += d
      k3 += math.exp(-d) - 1 + d
      n += 1
  est = jax.jit(rl.kl_estimators)(logp, ref_logp, mask)
  close([est["k1"], est["k3"]], [k1 / n, k3 / n])
  assert float(est["k3"]) >= 0
  empty = rl.kl_estimators(logp, ref_logp, np.zeros_like(mask))
  assert float(empty["k1"]) == 0.0 and float(empty["k3"]) == 0.0


def test_token_rewards_put_the_score_on_each_rows_last_answer_token():
  rng, mask, logp, ref_logp = rollout(5)
  score = rng.normal(0, 1, B).astype(np.float32)
  beta = 0.005
  got = np.asarray(jax.jit(rl.token_rewards)(score, logp, ref_logp, mask, beta))
  for b in range(B):
    positions = answer_positions(mask[b])
    for t in range(T):
      ref = 0.0
      if t in positions:
        ref = -beta * (float(logp[b, t]) - float(ref_logp[b, t]))
        if t == positions[-1]:
          ref += float(score[b])
      close(got[b, t], ref)
  assert not np.any(got[0])  # the empty row gets no score at all


def ref_gae(rewards, values, mask, gamma, lam):
  adv = np.zeros((B, T))
  for b in range(B):
    positions = answer_positions(mask[b])
    next_value = next_adv = 0.0  # after the last answer token the episode has ended
    for t in reversed(positions):
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      next_adv = delta + gamma * lam * next_adv
      next_value = float(values[b, t])
      adv[b, t] = next_adv
  return adv, np.where(mask > 0, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 0.0), (0.99, 1.0)])
def test_gae_matches_loop_on_ragged_offsets(gamma, lam):
  rng = np.random.default_rng(6)
  mask = ragged_mask(rng)
  rewards = rng.normal(0, 1, (B, T)).astype(np.float32)
  values = rng.normal(0, 1, (B, T)).astype(np.float32)
  # Garbage off the answer must change nothing.
  rewards_p = np.where(mask > 0, rewards, np.nan).astype(np.float32)
  values_p = np.where(mask > 0, values, 1e6).astype(np.float32)
  adv, ret = jax.jit(rl.gae, static_argnums=(3, 4))(rewards_p, values_p, mask, gamma, lam)
  ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
  close(adv, ref_adv)
  close(ret, ref_ret)
  assert not np.any(np.asarray(adv)[mask == 0]) and not np.any(np.asarray(ret)[mask == 0])


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
  rng = np.random.default_rng(7)
  mask = ragged_mask(rng)
  rewards = rng.normal(0, 1, (B, T)).astype(np.float32)
  values = rng.normal(0, 1, (B, T)).astype(np.float32)
  adv, ret = rl.gae(rewards, values, mask, 1.0, 1.0)
  for b in range(B):
    for t in answer_positions(mask[b]):
      to_go = sum(float(rewards[b, s]) for s in answer_positions(mask[b]) if s >= t)
      close(adv[b, t], to_go - float(values[b, t]))
      close(ret[b, t], to_go)
  adv, ret = rl.gae(rewards, values, np.zeros_like(mask), 1.0, 1.0)
  assert not np.any(np.asarray(adv)) and not np.any(np.asarray(ret))


def test_ppo_policy_loss_matches_loop():
  rng, mask, logp, _ = rollout(8)
  old_logp = np.where(mask > 0, logp + rng.normal(0, 0.3, (B, T)), 0.0).astype(np.float32)
  advantages = rng.normal(0, 1, (B, T)).astype(np.float32)
  eps = 0.2
  loss, m = jax.jit(rl.ppo_policy_loss)(logp, old_logp, advantages, mask, eps)
  total = clipped = kl = n = 0.0
  for b in range(B):
    for t in answer_positions(mask[b]):
      ratio = math.exp(float(logp[b, t]) - float(old_logp[b, t]))
      a = float(advantages[b, t])
      plain, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
      total += max(plain, clip)
      clipped += clip > plain
      kl += ratio - 1 - math.log(ratio)
      n += 1
  close([loss, m["loss"], m["clip_fraction"], m["approx_kl"], m["weight"]],
        [total / n, total / n, clipped / n, kl / n, n])
  assert 0 < float(m["clip_fraction"]) < 1  # the inputs exercise both branches
  # At old == new the loss is -mean(A) and its gradient is -A / n on answer tokens.
  grad = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old_logp, advantages, mask)[0])(
      jnp.asarray(old_logp))
  close(grad, np.where(mask > 0, -advantages / n, 0.0))
  loss, m = rl.ppo_policy_loss(logp, old_logp, advantages, np.zeros_like(mask))
  assert float(loss) == 0.0 and float(m["weight"]) == 0.0


def test_value_loss_matches_loop():
  rng = np.random.default_rng(9)
  mask = ragged_mask(rng)
  old_values = rng.normal(0, 1, (B, T)).astype(np.float32)
  values = (old_values + rng.normal(0, 0.4, (B, T))).astype(np.float32)
  returns = rng.normal(0, 1, (B, T)).astype(np.float32)
  eps = 0.2
  loss, m = jax.jit(rl.value_loss)(values, old_values, returns, mask, eps)
  total = clipped = n = 0.0
  for b in range(B):
    for t in answer_positions(mask[b]):
      v, old, r = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
      v_clip = min(max(v, old - eps), old + eps)
      total += 0.5 * max((v - r) ** 2, (v_clip - r) ** 2)
      clipped += (v_clip - r) ** 2 > (v - r) ** 2
      n += 1
  close([loss, m["loss"], m["clip_fraction"], m["weight"]], [total / n, total / n, clipped / n, n])
  assert 0 < float(m["clip_fraction"]) < 1
  loss, m = rl.value_loss(values, old_values, returns, np.zeros_like(mask))
  assert float(loss) == 0.0 and float(m["weight"]) == 0.0
