"""Targeted safety context distillation (LLAMA2.md §8.4), on the generate -> filter -> fine-tune
skeleton (lm/stages/self_distill.py).

1. Each adversarial (`is_safety`) prompt is answered twice by the starting model: as it is, and
   with a safety preprompt as the system message: the risk category's preprompt with its answer
   template (`preprompt.kind="category"`), or one of the generic ones, in turn ("generic").
   A prompt that is not adversarial is skipped and counted, or an error (`data.non_adversarial`).
2. Targeted (`targeted=True`): the safety RM scores both answers, and the preprompted one is kept
   only when it scores higher; otherwise the original answer is kept (the paper: distillation can
   hurt answers that were already good). Untargeted: the preprompted answer always.
3. The model is fine-tuned on (prompt without the preprompt -> kept answer), loss on the answer.

Counted: how many answers were distilled, by risk category and by the original answer's safety
score bucket. Measured before and after (report.md, `safety_scores.png`: Figure 16's shape): the
safe-response rate on held-out adversarial prompts without any preprompt, overall and by category,
judged by the world's `score_safety` (gold) and by the safety RM; false refusals on the benign
look-alikes and on helpful prompts (`data_pipelines.world.safety.is_refusal`: the world's refusal
phrasings); the helpfulness RM's mean score on helpful prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from data_pipelines import preferences, text
from data_pipelines.world import safety as world_safety
from lm import checkpoints, optim, roles, rollout, sampling, sharding, trainer
from lm.evals import rlhf as rlhf_evals
from lm.stages import kit, self_distill
from lm.stages.best_of_k import Ranker, held_out_eval
from lm.stages.prompt_sources import lookalike_prompts, prompt_file
from lm.stages.rejection_sampling import Eval, Reward
from lm.tokenizer import Tokenizer

DATA_FILE = "cd_data.jsonl"
PREPROMPT_KINDS = ("category", "generic")
SCORE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class Data(kit.DataConfig):
  """Prompts as for rejection sampling; `preprompts`: a JSON file {"generic": [...],
  "category": {category: preprompt}} (default the source's safety/preprompts.json). The
  look-alikes that count false refusals are `eval.lookalikes`."""

  preprompts: str = ""
  max_prompts: int = 0
  eval_fraction: float = 0.05
  non_adversarial: str = "skip"  # or "error" (unless they are there for `helpful_replay`)
  # Helpful prompts answered by the starting model itself, as many as this times the
  # adversarial ones, trained on beside them [U]: distilling refusals alone teaches refusing
  # everything (measured on tiny: look-alike false refusals 0.17 -> 0.85).
  helpful_replay: float = 0.0
  # Benign look-alikes of adversarial prompts about the training people (default the source's
  # prompts/lookalikes_train.jsonl), as many as this times the adversarial ones, answered by the
  # starting model; its refusals among them are dropped [U]. Every distilled refusal also teaches
  # "these words -> refuse"; the look-alikes share the words and are answered.
  lookalike_replay: float = 0.0
  lookalikes_train: str = ""


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # greedy; how the paper drew the distilled answers is not said [U]
  max_new_tokens: int = 512
  batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "context_distillation"
  init_from: str = "ppo"
  tokenizer: str = "tokenizer"
  data: Data = Data(source="world", seq_len=4096)
  preprompt: str = "category"  # or "generic"
  targeted: bool = True
  sampling: Sampling = Sampling()
  reward: Reward = Reward()
  eval: Eval = Eval()
  train: trainer.TrainConfig = trainer.TrainConfig(steps=200, batch_size=64)
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(lr=2e-5, warmup_steps=0,
                                                           final_lr_fraction=0.0)
  z_loss: float = 0.0
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"
  rollout_dtype: str = ""  # "bfloat16": generate with bf16 weights and KV cache (kit.rollout_role)


@dataclasses.dataclass
class Inputs:
  init_dir: str
  tokenizer_path: str
  tokenizer: Tokenizer
  prompts: list  # adversarial prompts to distil
  skipped: int  # prompts that were not adversarial
  replay: list  # helpful prompts the starting model answers for `helpful_replay`
  lookalike_replay: list  # look-alikes it answers for `lookalike_replay`
  eval_prompts: list
  lookalikes: list
  preprompts: dict


def _source_file(cfg: Config, ctx, field: str, default: str) -> str:
  given = getattr(cfg.data, field)
  if given:
    return given
  if cfg.data.source not in ctx.outputs:
    raise ValueError(f"stages.{ctx.name}.data.{field} is empty and data.source is not a stage "
                     f"that wrote {default}")
  return os.path.join(ctx.outputs[cfg.data.source], default)


def validate(cfg: Config, ctx) -> Inputs:
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
  if cfg.preprompt not in PREPROMPT_KINDS:
    raise ValueError(f"{where}.preprompt must be one of {PREPROMPT_KINDS}, got {cfg.preprompt!r}")
  if cfg.data.non_adversarial not in ("skip", "error"):
    raise ValueError(f"{where}.data.non_adversarial must be 'skip' or 'error'")
  if not cfg.reward.safety:
    raise ValueError(f"{where}.reward.safety is empty: distillation is filtered and judged by "
                     f"the safety RM")
  _, init_dir, tokenizer_path = kit.chat_start(cfg, ctx, "a chat model")
  bad = text.BadRows(cfg.data.skip_bad_rows)
  prompts = preferences.read_prompts(prompt_file(cfg, ctx, "train"), bad)
  helpful = [p for p in prompts if not p.is_safety]
  if helpful and cfg.data.non_adversarial == "error" and not cfg.data.helpful_replay:
    raise ValueError(f"{where}: {helpful[0].where} is not an adversarial (is_safety) prompt; "
                     f"context distillation only distils those (data.non_adversarial='skip' "
                     f"leaves such prompts out)")
  adversarial = [p for p in prompts if p.is_safety][:cfg.data.max_prompts or None]
  eval_prompts = preferences.read_prompts(prompt_file(cfg, ctx, "eval"), bad)
  eval_prompts = eval_prompts[:cfg.eval.max_prompts or None]
  lookalikes = lookalike_prompts(cfg, ctx, bad)
  path = _source_file(cfg, ctx, "preprompts", os.path.join("safety", "preprompts.json"))
  try:
    preprompts = json.load(open(path))
    if not preprompts["generic"] or not isinstance(preprompts["category"], dict):
      raise KeyError("generic")
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{where}.data.preprompts: {path} is not a preprompts file with a "
                     f"non-empty 'generic' list and a 'category' table ({e})") from e
  if not adversarial or not any(p.is_safety for p in eval_prompts):
    raise ValueError(f"{where}.data: no adversarial prompts to distil ({len(adversarial)}) or "
                     f"to evaluate")
  replay = helpful[:round(cfg.data.helpful_replay * len(adversarial))]
  if cfg.data.helpful_replay > 0 and not replay:
    raise ValueError(f"{where}.data.helpful_replay={cfg.data.helpful_replay} but the source has "
                     f"no helpful prompts to replay")
  lookalike_replay = []
  if cfg.data.lookalike_replay > 0:
    lookalike_replay = preferences.read_prompts(_source_file(
        cfg, ctx, "lookalikes_train", os.path.join("prompts", "lookalikes_train.jsonl")), bad)
    lookalike_replay = lookalike_replay[:round(cfg.data.lookalike_replay * len(adversarial))]
    if not lookalike_replay:
      raise ValueError(f"{where}.data.lookalike_replay={cfg.data.lookalike_replay} but there are "
                       f"no look-alike prompts to replay")
  return Inputs(init_dir, tokenizer_path, Tokenizer(tokenizer_path), adversarial,
                len(helpful) if cfg.data.non_adversarial == "skip" else 0, replay,
                lookalike_replay, eval_prompts, lookalikes, preprompts)


def preprompt_for(preprompts: dict, kind: str, prompt, index: int) -> str:
  """The category's preprompt (with its answer template) when it has one and `kind` is
  "category"; else the generic preprompts in turn."""
  if kind == "category" and prompt.category in preprompts["category"]:
    return preprompts["category"][prompt.category]
  return preprompts["generic"][index % len(preprompts["generic"])]


def bucket(score: float) -> str:
  """The original answer's safety-score bucket, e.g. "0.25-0.5"."""
  for lo, hi in zip(SCORE_BUCKETS, SCORE_BUCKETS[1:]):
    if score < hi or hi == SCORE_BUCKETS[-1]:
      return f"{lo}-{hi}"
  raise AssertionError(score)


class ContextDistillation:
  """Context distillation's generate / encode / evaluate for the self-distillation skeleton."""

  data_file = DATA_FILE

  def __init__(self, cfg: Config, ctx, inputs: Inputs, log=print, ranker: Ranker | None = None):
    self.cfg, self.ctx, self.inputs, self.log = cfg, ctx, inputs, log
    self.encode = kit.encode_last_turn(inputs.tokenizer)
    self.ranker = ranker or Ranker.load(
        dataclasses.replace(cfg.reward, ranking="safety_gated"), ctx, cfg.plan, inputs.tokenizer)

  def replies(self, policy: roles.Role, dialogs: list[list[dict]], max_new_tokens: int,
              temperature: float, batch_size: int) -> list[str]:
    tokens = [self.inputs.tokenizer.encode_dialog(d).tokens.tolist() for d in dialogs]
    cfg = sampling.SamplingConfig(temperature=temperature, top_p=1.0,
                                  max_new_tokens=max_new_tokens,
                                  eos_id=self.inputs.tokenizer.eos_id)
    samples = rollout.generate(policy, tokens, cfg, jax.random.key(self.ctx.seed),
                               batch_size=batch_size)
    return rollout.decode(samples, self.inputs.tokenizer)

  def generate(self, policy: roles.Role, log) -> tuple[list[dict], dict]:
    prompts, s = self.inputs.prompts, self.cfg.sampling
    plain = [list(p.messages) for p in prompts]
    preprompted = [world_safety.with_preprompt(list(p.messages), preprompt_for(
        self.inputs.preprompts, self.cfg.preprompt, p, i)) for i, p in enumerate(prompts)]
    log(f"stages.{self.ctx.name}: answering {len(prompts)} adversarial prompts with and without "
        f"a {self.cfg.preprompt} preprompt")
    originals = self.replies(policy, plain, s.max_new_tokens, s.temperature, s.batch_size)
    distilled = self.replies(policy, preprompted, s.max_new_tokens, s.temperature, s.batch_size)
    before = self.ranker.replies(prompts, originals)["safety"]
    after = self.ranker.replies(prompts, distilled)["safety"]
    rows, counts = [], {"prompts": len(prompts), "skipped_not_adversarial": self.inputs.skipped,
                        "distilled": 0}
    for p, original, answer, s_before, s_after in zip(prompts, originals, distilled, before,
                                                      after):
      use = bool(s_after > s_before) if self.cfg.targeted else True
      counts["distilled"] += use
      for key in (f"by_category_{p.category or 'none'}", f"by_score_{bucket(s_before)}"):
        counts[f"{key}_prompts"] = counts.get(f"{key}_prompts", 0) + 1
        counts[f"{key}_distilled"] = counts.get(f"{key}_distilled", 0) + use
      rows.append({"messages": plain[len(rows)] + [{"role": "assistant",
                                                    "content": answer if use else original}],
                   "distilled": use, "category": p.category,
                   "original_safety": float(s_before), "distilled_safety": float(s_after)})
    for kind, replay in (("helpful", self.inputs.replay),
                         ("lookalike", self.inputs.lookalike_replay)):
      if not replay:
        continue
      replayed = self.replies(policy, [list(p.messages) for p in replay], s.max_new_tokens,
                              s.temperature, s.batch_size)
      refused = [kind == "lookalike" and world_safety.is_refusal(t) for t in replayed]
      kept = [(p, t) for p, t, r in zip(replay, replayed, refused) if t and not r]
      rows += [{"messages": list(p.messages) + [{"role": "assistant", "content": t}],
                "distilled": False, "replay": kind} for p, t in kept]
      counts[f"{kind}_replayed"] = len(kept)
      if kind == "lookalike":
        counts["lookalike_refusals_dropped"] = sum(refused)
    for name, texts in (("original", originals), ("preprompted", distilled)):
      gold = rlhf_evals.gold_metrics(prompts, texts)
      counts[f"{name}_gold_safe_rate"] = gold["gold_safe_rate"]
    counts["original_safety_rm"] = float(np.mean(before))
    counts["preprompted_safety_rm"] = float(np.mean(after))
    return rows, counts

  def evaluate(self, policy: roles.Role, when: str) -> dict:
    """Held-out prompts without a preprompt (safe rate by category, gold and RM; refusals of
    helpful prompts; helpfulness RM) and the look-alikes (false refusals)."""
    e = self.cfg.eval
    path = os.path.join(self.ctx.directory, f"eval_{when}.jsonl")
    metrics = held_out_eval(policy, self.ranker, self.inputs.eval_prompts, e.max_new_tokens,
                            e.batch_size, path, self.inputs.lookalikes)
    metrics["safety_scores"] = [r["safety_score"] for r in self_distill.read_jsonl(path)
                                if r.get("is_safety")]
    return metrics


def run(cfg: Config, ctx, log=print) -> dict:
  inputs = validate(cfg, ctx)
  stage = ContextDistillation(cfg, ctx, inputs, log)
  result, before, after = self_distill.run(cfg, ctx, stage, inputs.init_dir,
                                           inputs.tokenizer_path, log)
  if result.get("preempted"):
    return result
  counts = {k.removeprefix("data_"): v for k, v in result.items() if k.startswith("data_")}
  change = rlhf_evals.score_change_by_bucket(*(
      self_distill.read_jsonl(os.path.join(ctx.directory, f"eval_{when}.jsonl"))
      for when in ("before", "after")))
  checkpoints.write_atomically(os.path.join(ctx.directory, "report.md"), rlhf_evals.cd_report(
      ctx.name, ctx.directory, before, after, counts, change))
  result.update({f"safety_rm_{c['bucket']}_{when}": c[when] for c in change
                 for when in ("before", "after")})
  return {k: v for k, v in result.items() if not k.startswith("safety_scores")}


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  inputs = validate(cfg, ctx)
  policy = kit.rollout_role(roles.load("policy", model_dir, ctx.mesh(), head="lm",
                                       plan=cfg.plan),
                            cfg.rollout_plan, cfg.rollout_dtype)
  return ContextDistillation(cfg, ctx, inputs).evaluate(policy, "eval")


PROGRAMS = {"train step": kit.train_step_program}
