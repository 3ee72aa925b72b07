"""One PPO iteration's experience, and the loss its update minimises (LLAMA2.md §7.3).

The rollout's rows (prompt + sampled answer, right-padded: lm/rollout.py `training_rows`) are read
by four models: the policy (log-probs of the sampled tokens, recomputed on the training layout so
the first update starts at ratio 1 exactly), the reference π_0 (log-probs), the value model (V at
every position) and the two reward models (a score at each answer's EOS). With the plain functions
of lm/rl.py, on B rows of T positions:

  R_c    = safety_gated_reward(R_h, R_s, is_safety)                          [B]
  score  = WHITEN(LOGIT(R_c)) - missing_eos_penalty · (no EOS)               [B]
  r_t    = score at the answer's last token - β (log π - log π_0) per answer token   [B, T]
  A, R   = GAE(r, V); A whitened over the batch's answer tokens               [B, T]

The update minimises PPO's clipped surrogate plus `value_coef` × the clipped value loss over the
trainable tree {"policy", "value"} with one optimizer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import losses, model, rl, sharding, trainer
from lm.roles import Role

WHITENINGS = ("batch", "rm", "none")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO's hyperparameters; the paper's table (LLAMA2.md §7.3) where it gives one.

  Paper: batch 512 prompts, mini-batch 64 (8 optimizer steps per iteration), one epoch, clip 0.2,
  β 0.01 (7B/13B) or 0.005 (34B/70B), 200-400 iterations. Not in the paper [U]: GAE γ and λ, the
  value loss and its clip and weight, how rewards are whitened, the missing-EOS penalty.
  """

  iterations: int = 300
  prompts_per_iteration: int = 512
  minibatch_size: int = 64
  epochs: int = 1
  grad_accum: int = 1
  beta: float = 0.01
  gamma: float = 1.0  # episodes are one answer long: no discounting
  lam: float = 0.95
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  value_coef: float = 0.5
  # "batch": each iteration's own mean and std of LOGIT(R_c); "rm": the mean and std each RM saved
  # (DIR/reward.json), per row the RM the gate chose; "none": LOGIT(R_c) as it is.
  whiten_rewards: str = "batch"
  missing_eos_penalty: float = 1.0  # in whitened-score units, for answers cut at max_new_tokens

  def __post_init__(self):
    if min(self.iterations, self.prompts_per_iteration, self.minibatch_size, self.epochs,
           self.grad_accum) < 1:
      raise ValueError(f"PPO counts must be >= 1: {self}")
    if self.prompts_per_iteration % self.minibatch_size:
      raise ValueError(f"prompts_per_iteration={self.prompts_per_iteration} is not a multiple of "
                       f"minibatch_size={self.minibatch_size}")
    if self.whiten_rewards not in WHITENINGS:
      raise ValueError(f"whiten_rewards must be one of {WHITENINGS}, got "
                       f"{self.whiten_rewards!r}")

  @property
  def steps_per_iteration(self) -> int:
    return self.epochs * self.prompts_per_iteration // self.minibatch_size


# ---------------------------------------------------------------------------------------------
# Reading the rollout with each model.

@functools.partial(jax.jit, static_argnums=0)
def logprobs_program(graphdef, params, tokens, positions, segment_ids, targets):
  """[B, T] log-probs of `targets` under an lm-head model."""
  logits, _ = model.apply(graphdef, params, tokens, positions=positions, segment_ids=segment_ids)
  return losses.token_logprobs(logits, targets)


@functools.partial(jax.jit, static_argnums=0)
def values_program(graphdef, params, tokens, positions, segment_ids):
  """[B, T] scalar-head outputs (the value model's V at each position)."""
  values, _ = model.apply(graphdef, params, tokens, positions=positions, segment_ids=segment_ids)
  return values


def per_token(role: Role, rows: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
  """[N, T] float32: log-probs of rows["targets"] (an lm head) or values (a scalar head), run
  `batch_size` rows at a time on the role's mesh and plan; the last batch is padded."""
  n = rows["tokens"].shape[0]
  names = ("tokens", "positions", "segment_ids") + (("targets",) if role.head == "lm" else ())
  program = logprobs_program if role.head == "lm" else values_program
  out = np.zeros(rows["tokens"].shape, np.float32)
  with jax.set_mesh(role.mesh):
    for start in range(0, n, batch_size):
      batch = [rows[k][start:start + batch_size] for k in names]
      real = batch[0].shape[0]
      batch = [np.concatenate([x, np.zeros((batch_size - real,) + x.shape[1:], x.dtype)])
               if real < batch_size else x for x in batch]
      placed = [jax.device_put(x, sharding.data_sharding(role.mesh, 2, role.rules, x.shape))
                for x in batch]
      out[start:start + real] = np.asarray(jax.device_get(
          program(role.graphdef, role.params, *placed)))[:real]
  return out


# ---------------------------------------------------------------------------------------------
# Rewards and advantages.

def whitened_scores(scores: dict[str, np.ndarray], is_safety: np.ndarray, how: str,
                    threshold: float = 0.15, stats: dict | None = None) -> np.ndarray:
  """WHITEN(LOGIT(R_c)) [B] float32 from the RMs' scores ({"reward": R_c, "safety": R_s} on the
  sigmoid scale).

  `how`: "batch" whitens over these B rows; "rm" uses `stats` ({"helpful": (mean, std),
  "safety": (mean, std)} of each RM's raw scores), per row the RM whose score R_c is; "none"
  returns LOGIT(R_c).
  """
  raw = np.asarray(rl.logit(scores["reward"]), np.float32)
  if how == "batch":
    return np.asarray(rl.whiten(raw, np.ones_like(raw)))
  if how == "none":
    return raw
  gated = np.asarray(is_safety, bool).copy()
  if "safety" in scores:
    gated |= np.asarray(scores["safety"]) < threshold
  helpful_mean, helpful_std = stats["helpful"]
  safety_mean, safety_std = stats.get("safety", stats["helpful"])
  mean = np.where(gated, safety_mean, helpful_mean)
  std = np.where(gated, safety_std, helpful_std)
  return ((raw - mean) / np.maximum(std, 1e-6)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("beta", "gamma", "lam"))
def advantages_program(score, logp, ref_logp, values, mask, *, beta, gamma, lam):
  """Eq. 4's per-token rewards, GAE and the KL figures, for B rows.

  Args:
    score: [B] whitened sequence scores. logp, ref_logp, values, mask: [B, T].

  Returns:
    {"rewards", "advantages" (whitened over answer tokens), "returns"} [B, T] and scalars
    "kl_k1", "kl_k3" (per token), "kl_sequence" (summed over each answer, mean over rows) and
    "kl_reward" (the mean per-answer total of the -β·k1 terms the rewards carry).
  """
  rewards = rl.token_rewards(score, logp, ref_logp, mask, beta)
  advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
  kl = rl.kl_estimators(logp, ref_logp, mask)
  per_answer = jnp.sum(jnp.where(mask > 0, logp - ref_logp, 0.0), axis=1)
  return {"rewards": rewards, "advantages": rl.whiten(advantages, mask), "returns": returns,
          "kl_k1": kl["k1"], "kl_k3": kl["k3"], "kl_sequence": jnp.mean(per_answer),
          "kl_reward": -beta * jnp.mean(per_answer)}


# ---------------------------------------------------------------------------------------------
# The update.

UPDATE_FIELDS = ("tokens", "targets", "positions", "segment_ids", "answer_mask", "old_logprobs",
                 "old_values", "advantages", "returns")


def loss_fn(policy_graphdef, value_graphdef, cfg: PPOConfig) -> trainer.LossFn:
  """`({"policy", "value"}, None, batch of UPDATE_FIELDS [B, T], rng) -> (loss, metrics)`."""

  def ppo_loss(trainable, frozen, batch, rng):
    del frozen, rng
    inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    mask = batch["answer_mask"]
    logits, _ = model.apply(policy_graphdef, trainable["policy"], batch["tokens"], **inputs)
    logp = losses.token_logprobs(logits, batch["targets"])
    policy_loss, policy_metrics = rl.ppo_policy_loss(logp, batch["old_logprobs"],
                                                     batch["advantages"], mask, cfg.clip_eps)
    values, _ = model.apply(value_graphdef, trainable["value"], batch["tokens"], **inputs)
    v_loss, v_metrics = rl.value_loss(values, batch["old_values"], batch["returns"], mask,
                                      cfg.value_clip_eps)
    entropy = jax.lax.stop_gradient(losses.token_entropy(logits))
    weight = policy_metrics["weight"]
    loss = policy_loss + cfg.value_coef * v_loss
    return loss, {"loss": loss, "policy_loss": policy_loss, "value_loss": v_loss,
                  "clip_fraction": policy_metrics["clip_fraction"],
                  "approx_kl": policy_metrics["approx_kl"],
                  "value_clip_fraction": v_metrics["clip_fraction"],
                  "entropy": jnp.sum(entropy * mask) / jnp.maximum(weight, 1.0),
                  "weight": weight}

  return ppo_loss
