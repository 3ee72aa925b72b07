"""PPO with the safety-gated, whitened reward and a per-token KL penalty (LLAMA2.md §7.3).

Five roles: the policy and the value model train together (one optimizer over
{"policy", "value"}, on the training plan); the reference π_0 (the model PPO starts from) and the
two reward models are frozen (optionally in bf16). Each iteration:

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
evaluations without a gain stop the run early. The training state (both trees, optimizer, position, the
evaluation history) is checkpointed in DIR/state at iteration ends, every `checkpoint_every`
iterations and at each evaluation: a run killed at any moment resumes from there and repeats
exactly what it would have done (each iteration's prompts, samples and mini-batches come from
keys folded with the iteration). Rollout, scoring, update and weight movement are timed apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import preferences, text
from lm import (checkpoints, configs, hardware, model, optim, roles, rollout, sampling,
                sharding, trainer)
from lm.evals import rlhf as rlhf_evals
from lm.stages import kit, self_distill
from lm.stages import ppo_experience as experience
from lm.stages.best_of_k import Ranker, held_out_eval
from lm.stages.rejection_sampling import Reward, prompt_file

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
  max_new_tokens: int = 512
  batch_size: int = 64
  max_prompts: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "ppo"
  init_from: str = "rs_v4"  # the policy's start and the reference π_0
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
  checkpoint_every: int = 10  # iterations
  keep_checkpoints: int = 2
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"


@dataclasses.dataclass
class Inputs:
  model_cfg: configs.ModelConfig
  init_dir: str
  value_dir: str
  tokenizer_path: str
  tokenizer: object
  prompts: list  # data_pipelines.preferences.Prompt
  prompt_tokens: list[list[int]]
  eval_prompts: list
  too_long: int
  rm_stats: dict | None  # {"helpful": (mean, std), "safety": ...} for whiten_rewards="rm"


def validate(cfg: Config, ctx) -> Inputs:
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
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
  stats = None
  if cfg.ppo.whiten_rewards == "rm":
    stats = {}
    for track, reference in (("helpful", cfg.reward.helpful), ("safety", cfg.reward.safety)):
      if not reference:
        continue
      path = os.path.join(ctx.output_of(reference), "reward.json")
      if not os.path.exists(path):
        raise ValueError(f"{where}.ppo.whiten_rewards='rm' needs {path} (written by the reward "
                         f"stage); use 'batch' for a reward model without it")
      saved = json.load(open(path))
      stats[track] = (saved["score_mean"], saved["score_std"])
  return Inputs(model_cfg, init_dir, value_dir, tokenizer_path, tokenizer, prompts, encoded,
                eval_prompts, too_long, stats)


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


class PPO:
  """The stage's models and its iteration: rollout -> experience -> update -> weight movement."""

  def __init__(self, cfg: Config, ctx, inputs: Inputs, log=print):
    self.cfg, self.ctx, self.inputs, self.log = cfg, ctx, inputs, log
    mesh = ctx.mesh()
    self.policy = roles.load("policy", inputs.init_dir, mesh, head="lm", plan=cfg.plan,
                             trainable=True)
    self.value = roles.load("value", inputs.value_dir, mesh, head="scalar", plan=cfg.plan,
                            trainable=True, seed=ctx.seed)
    self.reference = roles.load("reference", inputs.init_dir, mesh, head="lm", plan=cfg.plan,
                                dtype=cfg.reference_dtype or None)
    self.ranker = Ranker.load(cfg.reward, ctx, cfg.plan, inputs.tokenizer)
    self.trainer = build_trainer(cfg, self.policy.model_cfg, self.value.model_cfg, mesh)
    self.sampling = sampling.SamplingConfig(
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens, eos_id=inputs.tokenizer.eos_id)
    self._rollout_copy: roles.Role | None = None

  def rollout_policy(self, params) -> roles.Role:
    """The policy with `params` on the rollout layout, reusing the previous copy's buffers."""
    moved = roles.move(self.policy.with_params(params), self.policy.mesh, self.cfg.rollout_plan,
                       out=self._rollout_copy)
    jax.block_until_ready(moved.params)
    self._rollout_copy = moved if moved.plan != self.policy.plan else None
    return moved

  def experience(self, trainable, prompts, samples: rollout.Samples) -> tuple[dict, dict]:
    """(update batch of experience.UPDATE_FIELDS [P, T], the iteration's figures)."""
    cfg = self.cfg
    # Rows as long as this batch's longest prompt + answer needs, in steps of the rollout's
    # length bucket (a few compiled shapes), not data.seq_len: most of that would be padding.
    longest = max(len(p) + n for p, n in zip(samples.prompts, samples.lengths))
    rows = rollout.training_rows(samples, min(cfg.data.seq_len, rollout.padded_length(longest)))
    size = cfg.rollout.scoring_batch_size
    logp = experience.per_token(self.policy.with_params(trainable["policy"]), rows, size)
    ref_logp = experience.per_token(self.reference, rows, size)
    values = experience.per_token(self.value.with_params(trainable["value"]), rows, size)
    is_safety = np.array([p.is_safety for p in prompts])
    scores = self.ranker.models.score(
        [np.asarray(p + samples.answer(i), np.int32) for i, p in enumerate(samples.prompts)],
        is_safety)
    gated = cfg.reward.ranking == "safety_gated"
    score = experience.whitened_scores(
        scores if gated else {"reward": scores["reward"]},
        is_safety if gated else np.zeros_like(is_safety), cfg.ppo.whiten_rewards,
        cfg.reward.threshold, self.inputs.rm_stats)
    score = score - cfg.ppo.missing_eos_penalty * (~samples.finished)
    mask = rows["answer_mask"]
    out = jax.device_get(experience.advantages_program(
        score, logp, ref_logp, values, mask, beta=cfg.ppo.beta, gamma=cfg.ppo.gamma,
        lam=cfg.ppo.lam))
    batch = {k: rows[k] for k in ("tokens", "targets", "positions", "segment_ids",
                                  "answer_mask")}
    batch.update(old_logprobs=logp, old_values=values, advantages=np.asarray(out["advantages"]),
                 returns=np.asarray(out["returns"]))
    on = mask > 0
    figures = {
        "reward": float(np.mean(scores["reward"])),
        "reward_helpful": float(np.mean(scores["helpful"])),
        "score": float(np.mean(score)),
        "kl_k1": float(out["kl_k1"]), "kl_k3": float(out["kl_k3"]),
        "kl_sequence": float(out["kl_sequence"]), "kl_reward": float(out["kl_reward"]),
        "answer_tokens": float(np.mean(samples.lengths)),
        "finished": float(np.mean(samples.finished)),
        "value_mean": float(np.mean(values[on])), "return_mean": float(np.mean(
            np.asarray(out["returns"])[on])),
        # The rollout's own log-probs against the training layout's: large gaps mean the two
        # layouts (or dtypes) disagree and the PPO ratio starts off 1.
        "rollout_logprob_gap": float(np.mean(np.abs(rows["logprobs"][on] - logp[on]))),
    }
    if "safety" in scores:
      figures["reward_safety"] = float(np.mean(scores["safety"]))
    if is_safety.any():
      figures["reward_on_safety_prompts"] = float(np.mean(scores["reward"][is_safety]))
    return batch, figures

  def evaluate(self, params, when: str) -> dict:
    """Held-out prompts: greedy replies judged by the RMs and the gold scorers (as rejection
    sampling's), and one sample per prompt at the rollout temperature, which is what PPO
    optimises: its RM reward and KL to π_0 (rm_reward_sampled, kl_sampled)."""
    policy = self.rollout_policy(params)
    metrics = held_out_eval(policy, self.ranker, self.inputs.eval_prompts,
                            self.cfg.eval.max_new_tokens, self.cfg.eval.batch_size,
                            os.path.join(self.ctx.directory, f"eval_{when}.jsonl"))
    prompts = self.inputs.eval_prompts
    tokens = [self.inputs.tokenizer.encode_dialog(list(p.messages)).tokens.tolist()
              for p in prompts]
    samples = rollout.generate(policy, tokens, self.sampling,
                               jax.random.key(self.ctx.seed + 1), batch_size=self.cfg.eval.batch_size)
    scores = self.ranker.models.score(
        [np.asarray(p + samples.answer(i), np.int32) for i, p in enumerate(samples.prompts)],
        [p.is_safety for p in prompts])
    longest = max(len(p) + n for p, n in zip(samples.prompts, samples.lengths))
    rows = rollout.training_rows(samples, rollout.padded_length(longest))
    size = self.cfg.rollout.scoring_batch_size
    gap = (experience.per_token(self.policy.with_params(params), rows, size)
           - experience.per_token(self.reference, rows, size))
    metrics["rm_reward_sampled"] = float(np.mean(scores["reward"]))
    metrics["kl_sampled"] = float(np.mean(np.sum(np.where(rows["answer_mask"] > 0, gap, 0.0),
                                                 axis=1)))
    return metrics


def build_trainer(cfg: Config, policy_cfg, value_cfg, mesh) -> trainer.Trainer:
  """One optimizer over {"policy", "value"}, stepping on mini-batches; steps are derived from
  the iterations."""
  ppo = cfg.ppo
  rules = sharding.plan_rules(cfg.plan)
  policy_graphdef, _ = model.abstract_model(policy_cfg, "lm", rules)
  value_graphdef, _ = model.abstract_model(value_cfg, "scalar", rules)
  steps = ppo.iterations * ppo.steps_per_iteration
  train_cfg = trainer.TrainConfig(
      steps=steps, batch_size=ppo.minibatch_size, grad_accum=ppo.grad_accum,
      log_every=ppo.steps_per_iteration, checkpoint_every=steps + 1,
      keep_checkpoints=cfg.keep_checkpoints)
  return trainer.Trainer(
      loss_fn=experience.loss_fn(policy_graphdef, value_graphdef, ppo),
      optimizer=optim.make_optimizer(cfg.optimizer, steps),
      schedule=optim.learning_rate(cfg.optimizer, steps), cfg=train_cfg, mesh=mesh,
      param_shardings={"policy": model.param_shardings(policy_cfg, mesh, rules, "lm"),
                       "value": model.param_shardings(value_cfg, mesh, rules, "scalar")},
      rules=rules)


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
  stage = PPO(cfg, ctx, inputs, log)
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
        _record_eval(cfg, progress, done, metrics, session.state.params["policy"], ctx.directory, log)
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
  log(f"  held-out at iteration {iteration}: RM reward of samples {metrics['rm_reward_sampled']:.3f} "
      f"(KL {metrics['kl_sampled']:.2f}), of greedy replies {metrics['rm_reward']:.3f}; gold "
      f"helpful {metrics['gold_helpful']:.3f}, safe {metrics['gold_safe_rate']:.3f}"
      + (" (best so far: the stage's model)" if gain else ""))


def _iteration(stage: PPO, session: trainer.Session, progress: Progress, log) -> None:
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
  """Gold and RM scores of any model directory's greedy replies to the held-out prompts."""
  inputs = validate(cfg, ctx)
  policy = kit.rollout_role(roles.load("policy", model_dir, ctx.mesh(), head="lm",
                                       plan=cfg.plan), cfg.rollout_plan)
  ranker = Ranker.load(cfg.reward, ctx, cfg.plan, inputs.tokenizer)
  return held_out_eval(policy, ranker, inputs.eval_prompts, cfg.eval.max_new_tokens,
                       cfg.eval.batch_size, os.path.join(ctx.directory, "eval_eval.jsonl"))


def update_program(cfg: Config, model_cfg, mesh):
  """PPO's update step for `lm aot`: policy and value (the policy's size, as the paper's value
  model from a same-size RM) under one AdamW, a mini-batch of `minibatch_size` rows of
  `data.seq_len`, on `plan`; nothing is allocated."""
  tr = build_trainer(cfg, model_cfg, model_cfg, mesh)
  state = tr.abstract_state({
      "policy": model.abstract_params(model_cfg, mesh, tr.rules),
      "value": model.abstract_params(model_cfg, mesh, tr.rules, head="scalar")})
  shape = (cfg.ppo.minibatch_size, cfg.data.seq_len)
  integer = ("tokens", "targets", "positions", "segment_ids")
  batch = {name: jax.ShapeDtypeStruct(shape, np.int32 if name in integer else np.float32,
                                      sharding=tr.batch_sharding(2))
           for name in experience.UPDATE_FIELDS}
  step = tr.jit_step(jax.tree.map(lambda a: a.sharding, state), batch)
  flops = 2 * hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers,
                                       cfg.data.seq_len, model_cfg.dim) * shape[0] * shape[1]
  return step, (state, batch, None), flops


def rollout_program(cfg: Config, model_cfg, mesh):
  """One rollout call: `rollout.batch_size` prompts at the longest `data.seq_len` allows, then
  `max_new_tokens` decode steps, on `rollout_plan`."""
  return kit.sampling_program(
      model_cfg, mesh, cfg.rollout_plan,
      sampling.SamplingConfig(temperature=cfg.rollout.temperature,
                              max_new_tokens=cfg.rollout.max_new_tokens),
      cfg.rollout.batch_size, cfg.data.seq_len - cfg.rollout.max_new_tokens)


def reference_program(cfg: Config, model_cfg, mesh):
  """The reference's log-probs of a scoring batch (`rollout.scoring_batch_size` rows of
  `data.seq_len`) in `reference_dtype`, on `plan`: the largest of the experience's forwards."""
  rules = sharding.plan_rules(cfg.plan)
  graphdef, _ = model.abstract_model(model_cfg, "lm", rules)
  params = model.abstract_params(model_cfg, mesh, rules)
  if cfg.reference_dtype:
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, jnp.dtype(cfg.reference_dtype), sharding=a.sharding), params)
  shape = (cfg.rollout.scoring_batch_size, cfg.data.seq_len)
  rows = jax.ShapeDtypeStruct(shape, np.int32,
                              sharding=sharding.data_sharding(mesh, 2, rules, shape))
  flops = hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers,
                                   cfg.data.seq_len, model_cfg.dim) / 3 * shape[0] * shape[1]
  return experience.logprobs_program, (graphdef, params, rows, rows, rows, rows), flops


def scoring_program(cfg: Config, model_cfg, mesh):
  """A reward model's scoring call, as rejection sampling's (the same `reward` section)."""
  from lm.stages import rejection_sampling
  return rejection_sampling.scoring_program(cfg, model_cfg, mesh)


PROGRAMS = {"rollout": rollout_program, "update step": update_program,
            "reference log-probs": reference_program, "scoring": scoring_program}
