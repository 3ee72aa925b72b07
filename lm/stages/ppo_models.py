"""PPO's five roles and what they do each iteration (lm/stages/ppo.py drives the loop): the
policy copied to the rollout layout, the experience read off a batch of rollouts by the policy,
reference, value and reward models, and the held-out evaluation; the trainer over
{"policy", "value"}; the programs `lm aot` compiles for the stage.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm import configs, hardware, model, optim, roles, rollout, sampling, sharding, trainer
from lm.stages import kit, self_distill
from lm.stages import ppo_experience as experience
from lm.stages.best_of_k import Ranker, answer_sequences, held_out_eval, sampled_rewards


class PPOModels:
  """The five roles, loaded, and what an iteration asks of them: a rollout copy of the policy,
  the experience of a batch of rollouts, the held-out evaluation."""

  def __init__(self, cfg, ctx, inputs, log=print):
    self.cfg, self.ctx, self.inputs, self.log = cfg, ctx, inputs, log
    mesh = ctx.mesh()
    self.policy = roles.load("policy", inputs.init_dir, mesh, head="lm", plan=cfg.plan,
                             trainable=True)
    self.value = roles.load("value", inputs.value_dir, mesh, head="scalar", plan=cfg.plan,
                            trainable=True, seed=ctx.seed)
    self.reference, self.ranker = load_frozen(cfg, ctx, inputs)
    self.trainer = build_trainer(cfg, self.policy.model_cfg, self.value.model_cfg, mesh)
    self.sampling = rollout_sampling(cfg, inputs.tokenizer.eos_id)
    self._rollout_copy: roles.Role | None = None

  def rollout_policy(self, params) -> roles.Role:
    """The policy with `params` on the rollout layout, reusing the previous copy's buffers."""
    moved = roles.move(self.policy.with_params(params), self.policy.mesh, self.cfg.rollout_plan,
                       out=self._rollout_copy)
    self._rollout_copy = moved if moved.plan != self.policy.plan else None
    moved = roles.in_dtype(moved, self.cfg.rollout_dtype)
    jax.block_until_ready(moved.params)
    return moved

  def experience(self, trainable, prompts, samples: rollout.Samples) -> tuple[dict, dict]:
    """(update batch of experience.UPDATE_FIELDS [P, T], the iteration's figures)."""
    cfg = self.cfg
    rows = answer_rows(samples, cfg.data.seq_len)
    size = cfg.rollout.scoring_batch_size
    logp = experience.per_token(self.policy.with_params(trainable["policy"]), rows, size)
    ref_logp = experience.per_token(self.reference, rows, size)
    values = experience.per_token(self.value.with_params(trainable["value"]), rows, size)
    is_safety = np.array([p.is_safety for p in prompts])
    scores = self.ranker.models.score(answer_sequences(samples), is_safety)
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
    figures["safety_prompts"] = float(is_safety.sum())
    if is_safety.any():
      figures["reward_on_safety_prompts"] = float(np.mean(scores["reward"][is_safety]))
    return batch, figures

  def evaluate(self, params, when: str) -> dict:
    return evaluate_policy(self.cfg, self.ctx, self.inputs, self.rollout_policy(params),
                           self.policy.with_params(params), self.reference, self.ranker, when)


def load_frozen(cfg, ctx, inputs) -> tuple[roles.Role, Ranker]:
  """The reference π_0 and the reward models, frozen, on `frozen_plan` (else `plan`)."""
  plan = cfg.frozen_plan or cfg.plan
  reference = roles.load("reference", inputs.reference_dir, ctx.mesh(), head="lm", plan=plan,
                         dtype=cfg.reference_dtype or None)
  return reference, Ranker.load(cfg.reward, ctx, plan, inputs.tokenizer)


def rm_whitening_stats(cfg, ctx, where: str) -> dict | None:
  """{"helpful": (mean, std), "safety": ...} each RM saved (DIR/reward.json) for
  whiten_rewards="rm"; None for the other whitenings."""
  if cfg.ppo.whiten_rewards != "rm":
    return None
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
  return stats


def answer_rows(samples: rollout.Samples, seq_len: int | None = None) -> dict[str, np.ndarray]:
  """`rollout.training_rows` [N, T] as long as the longest prompt + answer needs, in steps of
  the rollout's length bucket (a few compiled shapes), capped at `seq_len` when given: most of a
  full row would be padding."""
  longest = rollout.padded_length(max(len(p) + n for p, n in zip(samples.prompts,
                                                                  samples.lengths)))
  return rollout.training_rows(samples, longest if seq_len is None else min(seq_len, longest))


def evaluate_policy(cfg, ctx, inputs, rollout_policy: roles.Role, policy: roles.Role,
                    reference: roles.Role, ranker: Ranker, when: str) -> dict:
  """Held-out prompts: greedy replies judged by the RMs and the gold scorers, and look-alike
  false refusals (as rejection sampling's, into DIR/eval_<when>.jsonl), and the RM reward and KL
  to π_0 of samples at the rollout temperature (DIR/eval_<when>_samples.jsonl)."""
  metrics = held_out_eval(rollout_policy, ranker, inputs.eval_prompts, cfg.eval.max_new_tokens,
                          cfg.eval.batch_size, os.path.join(ctx.directory, f"eval_{when}.jsonl"),
                          inputs.lookalikes)
  metrics.update(held_out_samples(
      rollout_policy, policy, reference, ranker, inputs.eval_prompts,
      rollout_sampling(cfg, inputs.tokenizer.eos_id), cfg, ctx.seed,
      os.path.join(ctx.directory, f"eval_{when}_samples.jsonl")))
  return metrics


def held_out_samples(rollout_policy: roles.Role, policy: roles.Role, reference: roles.Role,
                     ranker: Ranker, prompts, sampling_cfg: sampling.SamplingConfig, cfg,
                     seed: int, path: str) -> dict:
  """`eval.samples_per_prompt` samples per held-out prompt at the rollout temperature (what PPO
  maximises), drawn by `rollout_policy` with a fixed key: {"rm_reward_sampled": their mean RM
  reward, "kl_sampled": their mean KL to π_0 in nats per answer, log π (the training-layout
  `policy`) - log π_0 summed over the answer}. Per prompt in `path`, so two evaluations compare
  prompt by prompt."""
  k = cfg.eval.samples_per_prompt
  samples, rewards = sampled_rewards(rollout_policy, ranker, prompts, k, sampling_cfg, seed,
                                     cfg.eval.batch_size)
  rows = answer_rows(samples)
  size = cfg.rollout.scoring_batch_size
  gap = experience.per_token(policy, rows, size) - experience.per_token(reference, rows, size)
  kl = np.sum(np.where(rows["answer_mask"] > 0, gap, 0.0), axis=1).reshape(len(prompts), k)
  reward = rewards.mean(axis=1)
  self_distill.write_jsonl(path, [{"reward": float(r), "kl": float(d)}
                                  for r, d in zip(reward, kl.mean(axis=1))])
  return {"rm_reward_sampled": float(np.mean(reward)), "kl_sampled": float(np.mean(kl))}


def rollout_sampling(cfg, eos_id: int) -> sampling.SamplingConfig:
  """How the policy samples its rollouts (and the held-out samples): the `rollout` section."""
  return sampling.SamplingConfig(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                 max_new_tokens=cfg.rollout.max_new_tokens, eos_id=eos_id)


def build_trainer(cfg, policy_cfg, value_cfg, mesh) -> trainer.Trainer:
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


def update_program(cfg, model_cfg, mesh):
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


def rollout_program(cfg, model_cfg, mesh):
  """One rollout call: `rollout.batch_size` prompts at the longest `data.seq_len` allows, then
  `max_new_tokens` decode steps, on `rollout_plan`."""
  return kit.sampling_program(
      model_cfg, mesh, cfg.rollout_plan,
      sampling.SamplingConfig(temperature=cfg.rollout.temperature,
                              max_new_tokens=cfg.rollout.max_new_tokens),
      cfg.rollout.batch_size, cfg.data.seq_len - cfg.rollout.max_new_tokens)


def reference_program(cfg, model_cfg, mesh):
  """The reference's log-probs of a scoring batch (`rollout.scoring_batch_size` rows of
  `data.seq_len`) in `reference_dtype`, on the frozen roles' plan: the largest of the
  experience's forwards."""
  rules = sharding.plan_rules(cfg.frozen_plan or cfg.plan)
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


def scoring_program(cfg, model_cfg, mesh):
  """A reward model's scoring call, as rejection sampling's (the same `reward` section), on the
  frozen roles' plan."""
  from lm.stages import rejection_sampling
  return rejection_sampling.scoring_program(
      dataclasses.replace(cfg, plan=cfg.frozen_plan or cfg.plan), model_cfg, mesh)


PROGRAMS = {"rollout": rollout_program, "update step": update_program,
            "reference log-probs": reference_program, "scoring": scoring_program}
