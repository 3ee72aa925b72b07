"""PPO for Llama 2-Chat (LLAMA2.md §7.3) as plain functions of arrays (no Flax, no config).

What each function implements (equation numbers are the paper's, S1 §3.2.3):
  safety_gated_reward  R_c of Eq. 4: the Safety RM's score on safety prompts or when it is < 0.15,
                       the Helpfulness RM's otherwise.
  logit, whiten        R̃_c = WHITEN(LOGIT(R_c)) of Eq. 4 (batch statistics: the paper is silent).
  kl_penalty           the -β·D_KL term of Eq. 4, per token: -β·(log π_θ - log π_0) (k1 estimator).
  kl_estimators        k1 and k3 estimates of that KL, for logging (RLHF_PEERS.md: log both).
  token_rewards        Eq. 4 per token: R̃_c at each answer's last token, plus the KL term.
  gae                  generalised advantage estimation (Schulman et al. 2016) of Eq. 3's return.
  ppo_policy_loss      the clipped surrogate objective (Schulman et al. 2017), ε = 0.2 in the paper.
  value_loss           the clipped value-function loss (PPO2 style); the paper gives no value loss.

Shapes: B batch (rollouts), T positions. A mask [B, T] is 1 on answer (generated) tokens; within a
row they are contiguous but start where the (left-padded) prompt ends, so rows are ragged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  # where(), not x * mask: a masked-out -inf log-prob (a padding token) would turn 0 * inf into NaN.
  return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the counted entries; 0 (not NaN) when nothing counts."""
  count = jnp.sum(mask)
  return _masked_sum(x, mask) / jnp.where(count > 0, count, 1.0)


def safety_gated_reward(helpful_score: jax.Array, safety_score: jax.Array, is_safety: jax.Array,
                        threshold: float = 0.15) -> jax.Array:
  """R_c of Eq. 4: R_s if IS_SAFETY(p) or R_s < threshold, else R_h.

  Args:
    helpful_score, safety_score: [B] RM scores on the sigmoid scale [0, 1].
    is_safety: [B] bool/int, the prompt's safety tag.
    threshold: 0.15 in the paper (precision 0.89, recall 0.55 for unsafe answers). Strict: a
      safety score of exactly the threshold is not gated.

  Returns:
    [B] float32 scores in [0, 1].
  """
  safety_score = jnp.asarray(safety_score, jnp.float32)
  gate = jnp.asarray(is_safety).astype(bool) | (safety_score < threshold)
  return jnp.where(gate, safety_score, jnp.asarray(helpful_score, jnp.float32))


def logit(p: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LOGIT of Eq. 4, the inverse of the sigmoid: log(p / (1 - p)), any shape.

  p is first clipped to [eps, 1 - eps] so that scores of exactly 0 or 1 (a saturated sigmoid in
  fp32) give a finite ±13.8 for eps=1e-6 instead of ±inf, which whitening would turn into NaN.
  """
  p = jnp.clip(jnp.asarray(p, jnp.float32), eps, 1.0 - eps)
  return jnp.log(p) - jnp.log1p(-p)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
  """WHITEN of Eq. 4: rescale the masked entries to mean 0 and standard deviation 1.

  Args:
    x: any shape (e.g. [B] sequence rewards or [B, T] advantages).
    mask: x's shape, 1 where the entry belongs to the statistics and is whitened.
    shift_mean: if False, only divide by the std and keep the mean (the usual choice for rewards
      when their sign carries meaning; TRL's convention).
    eps: added to the variance; keeps 0 or 1 counted entries (variance 0) finite.

  Returns:
    x's shape, float32. Masked-out entries are returned unchanged (not zeroed), so whitening a
    padded batch never alters the padding. Uses the population std (divide by the count).
    With a single counted entry the result is 0 (shift_mean) or the entry itself.
  """
  x = jnp.asarray(x, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  mean = _masked_mean(x, mask)
  var = _masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask > 0, out, x)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
  """Per-token KL reward of Eq. 4: -beta * (logp - ref_logp) on answer tokens, 0 elsewhere.

  Args:
    logp, ref_logp: [B, T] log-probs of the sampled tokens under the policy π_θ and π_0.
    mask: [B, T], 1 on answer tokens.
    beta: 0.01 (7B, 13B) or 0.005 (34B, 70B) in the paper.

  Returns:
    [B, T] float32.
  """
  logp = jnp.asarray(logp, jnp.float32)
  return jnp.where(mask > 0, -beta * (logp - ref_logp), 0.0)


def kl_estimators(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> dict:
  """Per-token estimates of KL(π_θ ‖ π_0) from tokens sampled from π_θ, averaged over answer tokens.

  k1 = logp - ref_logp is unbiased but can be negative per token (the one kl_penalty uses);
  k3 = exp(ref - logp) - 1 - (ref - logp) is unbiased and never negative (Schulman's "low_var_kl").

  Args:
    logp, ref_logp, mask: [B, T].

  Returns:
    {"k1": scalar, "k3": scalar}, means over masked tokens (0 if there are none).
  """
  log_ratio = jnp.asarray(ref_logp, jnp.float32) - logp
  mask = jnp.asarray(mask, jnp.float32)
  return {"k1": _masked_mean(-log_ratio, mask),
          "k3": _masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)}


def last_token_mask(mask: jax.Array) -> jax.Array:
  """[B, T] -> [B, T] float32, 1 at each row's last position where mask == 1 (none if all 0)."""
  mask = jnp.asarray(mask) > 0
  t = mask.shape[-1]
  last = t - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
  return ((jnp.arange(t) == last[..., None]) & jnp.any(mask, axis=-1, keepdims=True)).astype(
      jnp.float32)


def token_rewards(score: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                  beta: float) -> jax.Array:
  """Eq. 4 spread over tokens: R̃_c at the answer's last token, -beta*(logp - ref_logp) on each.

  The score belongs at the answer's final token (its EOS), not after it: a score placed on the
  first padding position is masked out and lost (RLHF_PEERS.md, TRL #3750).

  Args:
    score: [B] sequence score, already LOGIT-ed and WHITEN-ed.
    logp, ref_logp: [B, T] log-probs of the sampled tokens under the policy and π_0.
    mask: [B, T], 1 on answer tokens.
    beta: KL coefficient.

  Returns:
    [B, T] float32 rewards, 0 off the answer. A row with no answer token gets no score.
  """
  score = jnp.asarray(score, jnp.float32)
  return kl_penalty(logp, ref_logp, mask, beta) + score[:, None] * last_token_mask(mask)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over the answer tokens of each row.

  On answer tokens, with t' the row's next answer token (none after the last one):
    delta_t = r_t + gamma * V_t' - V_t     (V_t' = 0 after the last answer token: episode end)
    A_t     = delta_t + gamma * lam * A_t'  (A_t' = 0 likewise)
    R_t     = A_t + V_t                    (the value target)
  Masked positions contribute nothing (their rewards and values are ignored) and are stepped
  over: the backward scan carries (V, A) through them unchanged, so the recursion chains answer
  tokens only, wherever in the row they start. With answers contiguous this is plain GAE.

  Args:
    rewards: [B, T], e.g. from token_rewards.
    values: [B, T], the value model's V(s_t) at each token.
    mask: [B, T], 1 on answer tokens.
    gamma, lam: discount and GAE λ (not given in the paper; 1.0 and 0.95 are common).

  Returns:
    (advantages, returns), both [B, T] float32 and 0 off the answer.
  """
  on = jnp.asarray(mask) > 0
  rewards = jnp.where(on, rewards, 0.0).astype(jnp.float32)
  values = jnp.where(on, values, 0.0).astype(jnp.float32)

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  # Time-major so scan walks T; reverse=True runs from the last position back to the first.
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, on.T), reverse=True)
  adv = adv.T
  return adv, jnp.where(on, adv + values, 0.0)


def ppo_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                    clip_eps: float = 0.2) -> tuple[jax.Array, dict]:
  """PPO's clipped surrogate: mean over answer tokens of max(-A·ρ, -A·clip(ρ, 1 ± eps)).

  Args:
    logp: [B, T] log-probs of the sampled tokens under the policy being trained.
    old_logp: [B, T] the same under the policy that sampled them (no gradient flows into it).
    advantages: [B, T], e.g. whitened gae() advantages.
    mask: [B, T], 1 on answer tokens.
    clip_eps: 0.2 in the paper.

  Returns:
    (loss, {"loss", "clip_fraction", "approx_kl", "weight"}): clip_fraction is the share of
    tokens where the clipped term is the larger one (the token gives no gradient); approx_kl is
    the k3 estimate of KL(old ‖ new), (ρ - 1) - log ρ; weight is the number of answer tokens.
  """
  logp = jnp.asarray(logp, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  log_ratio = logp - jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = _masked_mean(jnp.maximum(unclipped, clipped), mask)
  metrics = {
      "loss": loss,
      "clip_fraction": _masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approx_kl": _masked_mean(jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio), mask),
      "weight": jnp.sum(mask),
  }
  return loss, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip_eps: float = 0.2) -> tuple[jax.Array, dict]:
  """Clipped value loss: mean over answer tokens of 0.5·max((V - R)², (clip(V, V_old ± eps) - R)²).

  The clip keeps one PPO update from moving the value far from the one the advantages used.

  Args:
    values: [B, T] the value model's current predictions.
    old_values: [B, T] its predictions at rollout time (those gae() used).
    returns: [B, T] targets from gae().
    mask: [B, T], 1 on answer tokens.
    clip_eps: half-width of the trust region around old_values (in reward units).

  Returns:
    (loss, {"loss", "clip_fraction", "weight"}): clip_fraction is the share of tokens where the
    clipped error is the larger one.
  """
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  old_values = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
  # clip(v, lo, hi), not old + clip(v - old): inside the band it returns v bit-exactly, so the
  # clipped error never beats the plain one by a rounding error and clip_fraction stays honest.
  clipped_values = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
  err = jnp.square(values - returns)
  err_clipped = jnp.square(clipped_values - returns)
  loss = _masked_mean(0.5 * jnp.maximum(err, err_clipped), mask)
  metrics = {"loss": loss,
             "clip_fraction": _masked_mean((err_clipped > err).astype(jnp.float32), mask),
             "weight": jnp.sum(mask)}
  return loss, metrics
