"""PPO with the safety-gated, whitened reward and a per-token KL penalty (LLAMA2.md §7.3).

Five roles: the policy and the value model train together (one optimizer over
{"policy", "value"}, on the training plan); the reference π_0 (the model PPO starts from, or
`reference_from`) and the two reward models are frozen (optionally in bf16). Each iteration:

  1. `prompts_per_iteration` prompts, drawn in a seeded order (with `data.safety_share` of them
     `is_safety` when set), are answered once each by the policy through the rollout path, on a
     copy of its weights laid out by `rollout_plan`;
  2. the answers are read by the policy, the reference, the value model and both RMs, and turned
     into rewards and advantages (lm/stages/ppo_experience.py);
  3. the policy and value are updated for `epochs` passes over the batch in mini-batches;
  4. the new weights are moved to the rollout layout for the next iteration.

Every `eval.every` iterations (and at the end) the policy answers held-out prompts: samples at
the rollout temperature (their RM reward and KL to π_0: what PPO optimises) and greedy replies
(judged by the RMs and by the world's gold scorers). The stage's model (DIR/checkpoints) is the
policy at the best `eval.select_by` so far (the starting model counts), and `eval.patience`
evaluations without a gain stop the run early. The training state (both trees, optimizer,
position, the evaluation history) is checkpointed in DIR/state at iteration ends, every
`checkpoint_every` iterations and at each evaluation: a run killed at any moment resumes from
there and repeats exactly what it would have done (each iteration's prompts, samples and
mini-batches come from keys folded with the iteration). Rollout, scoring, update and weight
movement are timed apart.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from data_pipelines import preferences, text
from lm import checkpoints, configs, optim, roles, rollout, sharding, trainer
from lm.evals import rlhf as rlhf_evals
from lm.stages import kit, ppo_models, self_distill
from lm.stages import ppo_experience as experience
from lm.stages.prompt_sources import lookalike_prompts, prompt_file
from lm.stages.rejection_sampling import Reward

STATE_DIR = "state"
VALUE_DIR = "value"
SELECT_BY = ("rm_reward_sampled", "rm_reward", "gold_helpful", "gold_safe_rate")


@dataclasses.dataclass(frozen=True)
class Data:
  """Prompts as for rejection sampling (a stage that wrote prompts/, or JSONL); `seq_len` bounds
  prompt + answer (longer prompts are left out and counted); `safety_share` in [0, 1] fixes the
  share of `is_safety` prompts in each iteration (-1: as they come in the source)."""

  source: str = "world"
  eval_source: str = ""
  seq_len: int = 4096
  max_prompts: int = 0
  safety_share: float = -1.0
  skip_bad_rows: bool = False


@dataclasses.dataclass(frozen=True)
class Rollout:
  temperature: float = 1.0  # the paper does not give PPO's sampling temperature [U]
  top_p: float = 1.0
  max_new_tokens: int = 512
  batch_size: int = 64  # rows per generate call
  scoring_batch_size: int = 16  # rows per forward of the policy, reference and value


@dataclasses.dataclass(frozen=True)
class Eval:
  """Held-out evaluations every `every` iterations (0: at the start and end only). The stage's
  model is the policy at the best `select_by` (the paper does not say how its PPO checkpoints
  were picked [U]): by default the RM reward of samples at the rollout temperature, the quantity
  PPO maximises; "rm_reward" is that of greedy replies. `patience` > 0 stops after that many
  evaluations without a gain."""

  every: int = 25
  patience: int = 0
  select_by: str = "rm_reward_sampled"
  samples_per_prompt: int = 1  # of the sampled evaluation
  max_new_tokens: int = 512
  batch_size: int = 64
  max_prompts: int = 0
  lookalikes: str = ""  # as rejection sampling's eval.lookalikes


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "ppo"
  init_from: str = "rs_v4"  # the policy's start and the reference π_0
  # Another reference π_0 than the start, e.g. PPO continued from an earlier PPO stage with the
  # KL still measured from the model RLHF began with; "" for init_from.
  reference_from: str = ""
  value_from: str = "rm_helpful"  # the value model's start (a scalar head is put on an lm) [U]
  tokenizer: str = "tokenizer"
  data: Data = Data()
  rollout: Rollout = Rollout()
  reward: Reward = Reward()
  ppo: experience.PPOConfig = experience.PPOConfig()
  eval: Eval = Eval()
  # LLAMA2.md §7.3: AdamW (0.9, 0.95, 1e-5), weight decay 0.1, clip 1.0, constant LR 1e-6.
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(lr=1e-6, schedule="constant",
                                                           warmup_steps=0)
  reference_dtype: str = ""  # e.g. "bfloat16" for the frozen reference
  frozen_plan: str = ""  # the reference's and the RMs' plan; "" for the training `plan`
  checkpoint_every: int = 10  # iterations
  keep_checkpoints: int = 2
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"
  rollout_dtype: str = ""  # "bfloat16": generate with bf16 weights and KV cache (kit.rollout_role)


@dataclasses.dataclass
class Inputs:
  model_cfg: configs.ModelConfig
  init_dir: str
  reference_dir: str
  value_dir: str
  tokenizer_path: str
  tokenizer: object
  prompts: list  # data_pipelines.preferences.Prompt
  prompt_tokens: list[list[int]]
  eval_prompts: list
  lookalikes: list
  too_long: int
  rm_stats: dict | None  # {"helpful": (mean, std), "safety": ...} for whiten_rewards="rm"


def validate(cfg: Config, ctx) -> Inputs:
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
  if jax.process_count() > 1:
    # Each iteration's rollouts are made whole on one process and fed as its rows; feeding
    # each host its share of the prompts is not built yet.
    raise NotImplementedError(f"{where}: PPO runs on one host (process) for now; this run has "
                              f"{jax.process_count()}")
  if cfg.reward.ranking == "safety_gated" and not cfg.reward.safety:
    raise ValueError(f"{where}.reward.safety is empty: the safety-gated reward needs a safety RM "
                     f"(or set reward.ranking='helpful')")
  if cfg.rollout.max_new_tokens >= cfg.data.seq_len:
    raise ValueError(f"{where}: rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leaves no "
                     f"room for a prompt in data.seq_len ({cfg.data.seq_len})")
  if cfg.eval.select_by not in SELECT_BY:
    raise ValueError(f"{where}.eval.select_by must be one of {SELECT_BY}, got "
                     f"{cfg.eval.select_by!r}")
  if cfg.reward.seq_len < cfg.data.seq_len:
    raise ValueError(f"{where}.reward.seq_len ({cfg.reward.seq_len}) is shorter than "
                     f"data.seq_len ({cfg.data.seq_len}): the RMs could not read every answer")
  if not (cfg.data.safety_share == -1.0 or 0.0 <= cfg.data.safety_share <= 1.0):
    raise ValueError(f"{where}.data.safety_share must be in [0, 1] or -1, got "
                     f"{cfg.data.safety_share}")
  model_cfg, init_dir, tokenizer_path = kit.chat_start(cfg, ctx, "an RLHF (or SFT) model")
  reference_dir = ctx.output_of(cfg.reference_from) if cfg.reference_from else init_dir
  reference_cfg, _ = checkpoints.read_model_info(reference_dir)
  if reference_cfg.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"{where}.reference_from: {cfg.reference_from!r} has a vocabulary of "
                     f"{reference_cfg.vocab_size}, the policy {model_cfg.vocab_size}; the KL "
                     f"penalty compares their log-probs token by token")
  value_dir = ctx.output_of(cfg.value_from)
  value_cfg, _ = checkpoints.read_model_info(value_dir)
  if value_cfg.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"{where}.value_from: {cfg.value_from!r} has a vocabulary of "
                     f"{value_cfg.vocab_size}, the policy {model_cfg.vocab_size}")
  from lm.tokenizer import Tokenizer
  tokenizer = Tokenizer(tokenizer_path)
  bad = text.BadRows(cfg.data.skip_bad_rows)
  prompts = preferences.read_prompts(prompt_file(cfg, ctx, "train"), bad)
  prompts = prompts[:cfg.data.max_prompts or None]
  eval_prompts = preferences.read_prompts(prompt_file(cfg, ctx, "eval"), bad)
  eval_prompts = eval_prompts[:cfg.eval.max_prompts or None]
  budget = cfg.data.seq_len - cfg.rollout.max_new_tokens
  encoded = [tokenizer.encode_dialog(list(p.messages)).tokens.tolist() for p in prompts]
  fits = [i for i, t in enumerate(encoded) if len(t) <= budget]
  too_long = len(encoded) - len(fits)
  prompts, encoded = [prompts[i] for i in fits], [encoded[i] for i in fits]
  if not prompts or not eval_prompts:
    raise ValueError(f"{where}.data: no prompts to train on ({len(prompts)} within {budget} "
                     f"tokens) or to evaluate ({len(eval_prompts)})")
  share = cfg.data.safety_share
  kinds = {p.is_safety for p in prompts}
  if 0.0 < share < 1.0 and kinds != {True, False} or share == 1.0 and True not in kinds or (
      share == 0.0 and False not in kinds):
    raise ValueError(f"{where}.data.safety_share={share} needs both safety and helpful prompts; "
                     f"the source has {sum(p.is_safety for p in prompts)} safety prompts of "
                     f"{len(prompts)}")
  return Inputs(model_cfg, init_dir, reference_dir, value_dir, tokenizer_path, tokenizer,
                prompts, encoded, eval_prompts, lookalike_prompts(cfg, ctx, bad), too_long,
                ppo_models.rm_whitening_stats(cfg, ctx, where))


class Progress:
  """The outer loop's position, saved with every checkpoint: the next iteration, the held-out
  evaluations so far, the best one, and the time spent in each phase."""

  def __init__(self):
    self.iteration = 0
    self.evals: list[dict] = []
    self.best = {"iteration": -1, "value": None}
    self.without_gain = 0
    self.seconds = {"rollout": 0.0, "scoring": 0.0, "update": 0.0, "move": 0.0, "eval": 0.0}
    self.tokens = {"generated": 0, "updated": 0}

  def get_state(self) -> dict:
    return {"iteration": self.iteration, "evals": self.evals, "best": self.best,
            "without_gain": self.without_gain, "seconds": self.seconds, "tokens": self.tokens}

  def set_state(self, state: dict) -> None:
    self.iteration, self.evals, self.best = state["iteration"], state["evals"], state["best"]
    self.without_gain, self.seconds, self.tokens = (state["without_gain"], state["seconds"],
                                                    state["tokens"])


def iteration_prompts(prompts, safety_share: float, count: int, iteration: int,
                      seed: int) -> list[int]:
  """Indices of iteration `iteration`'s `count` prompts: each pool (all prompts, or the safety
  and the helpful ones apart) is walked in a fresh seeded permutation per pass."""
  def walk(pool: list[int], n: int, tag: int) -> list[int]:
    if n == 0:
      return []
    picked = []
    for position in range(iteration * n, (iteration + 1) * n):
      epoch, offset = divmod(position, len(pool))
      order = np.random.default_rng((seed, tag, epoch)).permutation(len(pool))
      picked.append(pool[order[offset]])
    return picked

  if safety_share < 0:
    return walk(list(range(len(prompts))), count, 0)
  safety = [i for i, p in enumerate(prompts) if p.is_safety]
  helpful = [i for i, p in enumerate(prompts) if not p.is_safety]
  n_safety = int(round(safety_share * count))
  return walk(safety, n_safety, 1) + walk(helpful, count - n_safety, 2)


def _save_once(directory: str, params, step: int) -> None:
  """params as DIR/checkpoints/<step>, only the newest kept; a step already saved (a resumed run
  repeating an evaluation) is left as it is."""
  manager = checkpoints.Manager(directory, max_to_keep=1, async_save=False)
  if step not in manager.all_steps():
    manager.save(step, params, force=True)
    manager.wait()
  manager.close()


def run(cfg: Config, ctx, log=print) -> dict:
  inputs = validate(cfg, ctx)
  stage = ppo_models.PPOModels(cfg, ctx, inputs, log)
  ppo = cfg.ppo
  checkpoints.write_model_info(ctx.directory, stage.policy.model_cfg, "lm", inputs.tokenizer_path)
  progress = Progress()
  # The session's progress line shows loss and ETA; tokens/s are the iteration line's (rows
  # change length with the batch).
  with trainer.Session(stage.trainer, os.path.join(ctx.directory, STATE_DIR),
                       params={"policy": stage.policy.params, "value": stage.value.params},
                       data=progress, log=log) as session:
    if not progress.evals:
      before = self_distill.cached(os.path.join(ctx.directory, self_distill.BEFORE_FILE),
                                   lambda: stage.evaluate(session.state.params["policy"],
                                                          "before"))
      _record_eval(cfg, progress, 0, before, session.state.params["policy"], ctx.directory, log)
      session.checkpoint(force=True)
    while progress.iteration < ppo.iterations and not _stopped(cfg, progress):
      if session.preempted:
        return session.stop()
      _iteration(stage, session, progress, log)
      done = progress.iteration
      evaluate = done == ppo.iterations or (cfg.eval.every and done % cfg.eval.every == 0)
      if evaluate:
        began = time.perf_counter()
        metrics = stage.evaluate(session.state.params["policy"], f"iteration_{done}")
        progress.seconds["eval"] += time.perf_counter() - began
        _record_eval(cfg, progress, done, metrics, session.state.params["policy"], ctx.directory,
                     log)
      if evaluate or done % cfg.checkpoint_every == 0 or _stopped(cfg, progress):
        session.checkpoint()
    nonfinite = session.finish()["nonfinite_steps"]
    value_dir = os.path.join(ctx.directory, VALUE_DIR)
    checkpoints.write_model_info(value_dir, stage.value.model_cfg, "scalar")
    _save_once(value_dir, session.state.params["value"], progress.iteration)
  result = dict(_summary(cfg, progress, inputs), nonfinite_steps=nonfinite)
  rows = _iteration_rows(ctx.directory)
  checkpoints.write_atomically(os.path.join(ctx.directory, "report.md"), rlhf_evals.ppo_report(
      ctx.name, ctx.directory, rows, progress.evals, result))
  return result


def _stopped(cfg: Config, progress: Progress) -> bool:
  return bool(cfg.eval.patience) and progress.without_gain >= cfg.eval.patience


def _record_eval(cfg: Config, progress: Progress, iteration: int, metrics: dict, params,
                 directory: str, log) -> None:
  """Adds an evaluation; a new best `eval.select_by` makes `params` the stage's model."""
  progress.evals.append({"iteration": iteration, **metrics})
  value = metrics[cfg.eval.select_by]
  gain = progress.best["value"] is None or value > progress.best["value"]
  if gain:
    progress.best = {"iteration": iteration, "value": value}
    progress.without_gain = 0
    _save_once(directory, params, iteration)
  else:
    progress.without_gain += 1
  log(f"  held-out at iteration {iteration}: RM reward of samples "
      f"{metrics['rm_reward_sampled']:.3f} (KL {metrics['kl_sampled']:.2f}), of greedy replies "
      f"{metrics['rm_reward']:.3f}; gold helpful {metrics['gold_helpful']:.3f}, safe "
      f"{metrics['gold_safe_rate']:.3f}"
      + (" (best so far: the stage's model)" if gain else ""))


def _iteration(stage: ppo_models.PPOModels, session: trainer.Session, progress: Progress,
               log) -> None:
  cfg, ppo, it = stage.cfg, stage.cfg.ppo, progress.iteration
  seconds = {}
  began = time.perf_counter()
  policy = stage.rollout_policy(session.state.params["policy"])
  seconds["move"] = time.perf_counter() - began
  picked = iteration_prompts(stage.inputs.prompts, cfg.data.safety_share,
                             ppo.prompts_per_iteration, it, stage.ctx.seed)
  prompts = [stage.inputs.prompts[i] for i in picked]
  began = time.perf_counter()
  samples = rollout.generate(policy, [stage.inputs.prompt_tokens[i] for i in picked],
                             stage.sampling, jax.random.fold_in(jax.random.key(stage.ctx.seed), it),
                             batch_size=cfg.rollout.batch_size)
  seconds["rollout"] = time.perf_counter() - began
  began = time.perf_counter()
  batch, figures = stage.experience(session.state.params, prompts, samples)
  seconds["scoring"] = time.perf_counter() - began
  began = time.perf_counter()
  generated = int(samples.lengths.sum())
  for epoch in range(ppo.epochs):
    order = np.random.default_rng((stage.ctx.seed, it, epoch)).permutation(len(prompts))
    for start in range(0, len(order), ppo.minibatch_size):
      rows = order[start:start + ppo.minibatch_size]
      session.step({k: v[rows] for k, v in batch.items()})
  jax.block_until_ready(session.state.params)
  seconds["update"] = time.perf_counter() - began
  for phase, value in seconds.items():
    progress.seconds[phase] += value
  progress.tokens["generated"] += generated
  updated = int((batch["segment_ids"] > 0).sum()) * ppo.epochs
  progress.tokens["updated"] += updated
  progress.iteration += 1
  total = sum(seconds.values())
  figures.update({f"{phase}_seconds": value for phase, value in seconds.items()})
  figures["rollout_tokens_per_second"] = generated / max(seconds["rollout"], 1e-9)
  figures["update_tokens_per_second"] = updated / max(seconds["update"], 1e-9)
  figures["move_share"] = seconds["move"] / max(total, 1e-9)
  session.writer.write(session.step_count, figures, prefix="iteration")
  log(f"iteration {progress.iteration}/{ppo.iterations} | reward {figures['reward']:.3f} | "
      f"KL {figures['kl_sequence']:.3f} nats/answer | rollout {seconds['rollout']:.1f}s "
      f"({figures['rollout_tokens_per_second']:,.0f} tok/s) | scoring {seconds['scoring']:.1f}s "
      f"| update {seconds['update']:.1f}s ({figures['update_tokens_per_second']:,.0f} tok/s) | "
      f"move {seconds['move']:.2f}s")


def _iteration_rows(directory: str) -> list[dict]:
  from lm import metrics_io
  return metrics_io.read_rows(os.path.join(directory, STATE_DIR), "iteration")


def _summary(cfg: Config, progress: Progress, inputs: Inputs) -> dict:
  """The stage's metrics: held-out before / at the best iteration, phases' time and rates."""
  before = progress.evals[0]
  best = next(e for e in progress.evals if e["iteration"] == progress.best["iteration"])
  keys = [k for k in before if k != "iteration" and isinstance(before[k], (int, float))]
  result = {k: best[k] for k in keys}
  result.update({f"{k}_before": before[k] for k in keys})
  last = progress.evals[-1]
  result.update({f"{k}_last": last[k] for k in keys})
  seconds, total = progress.seconds, sum(progress.seconds.values())
  result.update({
      "best_iteration": progress.best["iteration"], "iterations": progress.iteration,
      "stopped_early": progress.iteration < cfg.ppo.iterations,
      "prompts": len(inputs.prompts), "prompts_too_long": inputs.too_long,
      **{f"{phase}_seconds": round(v, 2) for phase, v in seconds.items()},
      **{f"{phase}_share": round(v / max(total, 1e-9), 4) for phase, v in seconds.items()},
      "rollout_tokens_per_second": progress.tokens["generated"] / max(seconds["rollout"], 1e-9),
      "update_tokens_per_second": progress.tokens["updated"] / max(seconds["update"], 1e-9),
      "eval_curve": [{"iteration": e["iteration"], "rm_reward": e["rm_reward"],
                      "rm_reward_sampled": e["rm_reward_sampled"], "kl_sampled": e["kl_sampled"],
                      "gold_helpful": e["gold_helpful"], "gold_safe_rate": e["gold_safe_rate"]}
                     for e in progress.evals]})
  return result


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  """The held-out evaluation of any model directory, as the stage runs it (greedy replies and
  samples, against the stage's reference and RMs)."""
  inputs = validate(cfg, ctx)
  policy = roles.load("policy", model_dir, ctx.mesh(), head="lm", plan=cfg.plan)
  reference, ranker = ppo_models.load_frozen(cfg, ctx, inputs)
  rollout_policy = kit.rollout_role(policy, cfg.rollout_plan, cfg.rollout_dtype)
  return ppo_models.evaluate_policy(cfg, ctx, inputs, rollout_policy, policy, reference, ranker,
                                    "eval")


PROGRAMS = ppo_models.PROGRAMS
