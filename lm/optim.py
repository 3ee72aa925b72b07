"""AdamW with the paper's schedules: linear warmup then cosine decay to a floor (LLAMA2.md §3.2).

Pretraining: peak by size, 2000 warmup steps, cosine to 10 % of peak. SFT: 2e-5 cosine. Reward
models: warmup 3 % of steps (at least 5), cosine to 10 %. PPO: constant 1e-6. All are this one
`OptimizerConfig`; no Flax here.
"""

from __future__ import annotations

import dataclasses
import math

import optax

SCHEDULES = ("cosine", "constant", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW and its schedule. Warmup is max(warmup_steps, ceil(warmup_fraction * total))."""

  lr: float = 3e-4
  schedule: str = "cosine"
  warmup_steps: int = 2000
  warmup_fraction: float = 0.0
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-5
  weight_decay: float = 0.1
  # Which parameters are decayed is not stated in the paper [U]: "all", or "matrices" to exempt
  # norm gains (1-D parameters).
  weight_decay_on: str = "all"
  grad_clip: float = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
    if self.weight_decay_on not in ("all", "matrices"):
      raise ValueError(f"weight_decay_on={self.weight_decay_on!r} must be 'all' or 'matrices'")
    if self.lr < 0 or self.warmup_steps < 0 or not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"invalid optimizer settings: {self}")


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
  return max(cfg.warmup_steps, math.ceil(cfg.warmup_fraction * total_steps))


def learning_rate(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """step -> learning rate: linear warmup from 0, then the chosen decay until `total_steps`."""
  warmup = min(warmup_steps(cfg, total_steps), total_steps)
  decay_steps = max(total_steps - warmup, 1)
  floor = cfg.lr * cfg.final_lr_fraction
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, floor, decay_steps)
  else:
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_fraction)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the schedule."""
  mask = _matrix_mask if cfg.weight_decay_on == "matrices" else None
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=mask),
  )


def _matrix_mask(params):
  """True for weight matrices, False for norm gains (whose names end in 'weight' under a norm)."""
  def walk(tree, under_norm=False):
    if isinstance(tree, dict):
      return {k: walk(v, under_norm or k.endswith("norm")) for k, v in tree.items()}
    return not under_norm
  return walk(params)
