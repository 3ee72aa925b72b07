"""Best-of-N selection and its measures (LLAMA2.md §7.2), on host arrays (numpy, no JAX).

  pick_best      the highest-rewarded eligible candidate per prompt (ties: the first)
  reward_vs_n    Figure 7: the mean over prompts of the max and the median reward among the
                 first N samples, for N = 1, 2, 4, ..., K
  best_of_n_kl   the KL of the best-of-N policy to the sampling policy, log N - (N - 1) / N
                 (an upper bound for continuous rewards; Stiennon et al. 2020, Gao et al. 2022)

Shapes: P prompts, K samples (or C candidates) per prompt.
"""

from __future__ import annotations

import math

import numpy as np


def pick_best(rewards: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
  """Index [P] of each row's highest reward among eligible candidates, -1 where none is.

  Ties go to the lowest index (np.argmax), so an order that puts the preferred source first
  (e.g. the current iteration before the pool) decides them deterministically.

  Args:
    rewards: [P, C] float.
    eligible: [P, C] bool, default all.
  """
  rewards = np.asarray(rewards, np.float64)
  if eligible is None:
    eligible = np.ones(rewards.shape, bool)
  masked = np.where(eligible, rewards, -np.inf)
  best = np.argmax(masked, axis=1)
  return np.where(np.any(eligible, axis=1), best, -1)


def sample_counts(k: int) -> list[int]:
  """N = 1, 2, 4, ... up to k, with k itself last when it is not a power of two."""
  counts = [1 << i for i in range(k.bit_length()) if (1 << i) <= k]
  return counts if counts[-1] == k else counts + [k]


def reward_vs_n(rewards: np.ndarray) -> dict[str, list[float]]:
  """Figure 7: for each N of `sample_counts(K)`, the mean over prompts of the max and of the
  median reward among each prompt's first N samples.

  Args:
    rewards: [P, K], sample order as drawn (the first N are an unbiased draw of N).

  Returns:
    {"n": [...], "max": [...], "median": [...], "kl_bound": [...]} (lists of equal length).
  """
  rewards = np.asarray(rewards, np.float64)
  if rewards.ndim != 2 or rewards.shape[1] == 0:
    raise ValueError(f"rewards must be [prompts, samples] with samples >= 1, got {rewards.shape}")
  counts = sample_counts(rewards.shape[1])
  return {"n": counts,
          "max": [float(rewards[:, :n].max(axis=1).mean()) for n in counts],
          "median": [float(np.median(rewards[:, :n], axis=1).mean()) for n in counts],
          "kl_bound": [best_of_n_kl(n) for n in counts]}


def best_of_n_kl(n: int) -> float:
  """log N - (N - 1) / N nats: 0 at N = 1, 1.83 at 16, 3.17 at 64."""
  if n < 1:
    raise ValueError(f"N must be >= 1, got {n}")
  return math.log(n) - (n - 1) / n
