"""Several chat models on the same held-out prompts, side by side (LLAMA2.md §8: the trade-off
between safety and helpfulness, measured at every stage of the recipe).

Each model (an earlier stage or a model directory) answers the held-out prompts and the benign
look-alikes greedily, the evaluation rejection sampling, PPO and context distillation run before
and after themselves (`best_of_k.held_out_eval`): the safe-response rate on adversarial prompts,
overall and by risk category, judged by the world's `score_safety` (gold) and by the safety RM;
false refusals on the look-alikes and on helpful prompts (`data_pipelines.world.safety.is_refusal`,
the world's refusal phrasings); the helpfulness RM's mean on helpful prompts and gold helpfulness.

`report.md` has one column per model and `tradeoff.png` the three curves (safety, helpfulness,
false refusals) against `x` (e.g. the share of safety data, Figure 15) or the models in order.
Each model's figures are saved as it finishes (DIR/evals/<label>.json): a killed run resumes at
the next model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from data_pipelines import preferences, text
from lm import checkpoints, roles, sharding
from lm.evals import tradeoff
from lm.stages import kit
from lm.stages.best_of_k import Ranker, held_out_eval
from lm.stages.prompt_sources import lookalike_prompts, prompt_file
from lm.stages.rejection_sampling import Eval, Reward
from lm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Data:
  """Held-out prompts: a stage that wrote prompts/eval.jsonl, or `eval_source` (JSONL)."""

  source: str = "world"
  eval_source: str = ""
  skip_bad_rows: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "chat_eval"
  models: tuple = ()  # earlier stages or model directories, in the table's order
  labels: tuple = ()  # their names in the table; () for the models as given
  x: tuple = ()  # a number per model to plot against (e.g. the safety-data share); () for none
  x_label: str = ""
  tokenizer: str = "tokenizer"
  data: Data = Data()
  reward: Reward = Reward()
  eval: Eval = Eval()
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"
  rollout_dtype: str = ""  # "bfloat16": generate with bf16 weights and KV cache (kit.rollout_role)


@dataclasses.dataclass
class Inputs:
  models: list[tuple[str, str]]  # (label, model directory)
  tokenizer: Tokenizer
  eval_prompts: list
  lookalikes: list


def validate(cfg: Config, ctx) -> Inputs:
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
  if not cfg.models:
    raise ValueError(f"{where}.models is empty: name the stages (or model directories) to "
                     f"evaluate")
  labels = tuple(cfg.labels) or tuple(os.path.basename(str(m).rstrip("/")) for m in cfg.models)
  for field, values in (("labels", cfg.labels), ("x", cfg.x)):
    if values and len(values) != len(cfg.models):
      raise ValueError(f"{where}.{field} has {len(values)} entries for {len(cfg.models)} models")
  if len(set(labels)) != len(labels):
    raise ValueError(f"{where}.labels must be distinct, got {labels}")
  if not cfg.reward.helpful:
    raise ValueError(f"{where}.reward.helpful is empty: the evaluation reads both RMs")
  models = []
  for label, model in zip(labels, cfg.models):
    directory = ctx.output_of(model)
    if not os.path.exists(os.path.join(directory, checkpoints.MODEL_FILE)):
      raise ValueError(f"{where}.models: {model!r} ({directory}) holds no model")
    models.append((label, directory))
  tokenizer_path = kit.resolve_tokenizer(cfg.tokenizer, ctx)
  if tokenizer_path is None:
    raise ValueError(f"{where}.tokenizer is empty: the models speak the chat format")
  bad = text.BadRows(cfg.data.skip_bad_rows)
  eval_prompts = preferences.read_prompts(prompt_file(cfg, ctx, "eval"), bad)
  eval_prompts = eval_prompts[:cfg.eval.max_prompts or None]
  if not eval_prompts:
    raise ValueError(f"{where}.data: no held-out prompts to evaluate on")
  return Inputs(models, Tokenizer(tokenizer_path), eval_prompts, lookalike_prompts(cfg, ctx, bad))


def evaluate_model(cfg: Config, ctx, inputs: Inputs, ranker: Ranker, model_dir: str,
                   label: str) -> dict:
  """One model's held-out figures (replies in DIR/eval_<label>.jsonl)."""
  policy = kit.rollout_role(roles.load("policy", model_dir, ctx.mesh(), head="lm",
                                       plan=cfg.plan),
                            cfg.rollout_plan, cfg.rollout_dtype)
  return held_out_eval(policy, ranker, inputs.eval_prompts, cfg.eval.max_new_tokens,
                       cfg.eval.batch_size, os.path.join(ctx.directory, f"eval_{label}.jsonl"),
                       inputs.lookalikes, cfg.eval.samples_per_prompt, cfg.eval.temperature,
                       ctx.seed)


def summary(results: dict[str, dict]) -> dict:
  """{label: figures} -> the stage's metrics, {"<label>/<figure>": value} of the table's rows."""
  return {f"{label}/{key}": value for label, figures in results.items()
          for key, value in figures.items() if key in tradeoff.SUMMARY_KEYS}


def run(cfg: Config, ctx, log=print) -> dict:
  inputs = validate(cfg, ctx)
  ranker = Ranker.load(cfg.reward, ctx, cfg.plan, inputs.tokenizer)
  os.makedirs(os.path.join(ctx.directory, "evals"), exist_ok=True)
  results = {}
  for i, (label, directory) in enumerate(inputs.models):
    path = os.path.join(ctx.directory, "evals", f"{label}.json")
    if os.path.exists(path):
      results[label] = json.load(open(path))
      continue
    start = time.time()
    results[label] = evaluate_model(cfg, ctx, inputs, ranker, directory, label)
    results[label]["eval_seconds"] = time.time() - start
    checkpoints.write_atomically(path, json.dumps(results[label], indent=1) + "\n")
    log(f"stages.{ctx.name}: {label} ({i + 1}/{len(inputs.models)}) "
        f"safe {results[label]['gold_safe_rate']:.3f} | look-alike refusals "
        f"{results[label].get('false_refusal_rate_lookalikes', 0.0):.3f} | helpful RM "
        f"{results[label]['rm_helpful_on_helpful']:.3f} | {results[label]['eval_seconds']:.0f}s")
  checkpoints.write_atomically(os.path.join(ctx.directory, "report.md"), tradeoff.report(
      ctx.name, ctx.directory, results, list(cfg.x), cfg.x_label))
  return summary(results)


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  """`lm eval`: the figures of `model_dir` when it holds a model (`--checkpoint`), else of every
  model of the stage, as its run measured them."""
  inputs = validate(cfg, ctx)
  ranker = Ranker.load(cfg.reward, ctx, cfg.plan, inputs.tokenizer)
  if os.path.exists(os.path.join(model_dir, checkpoints.MODEL_FILE)):
    return evaluate_model(cfg, ctx, inputs, ranker, model_dir, "eval")
  return summary({label: evaluate_model(cfg, ctx, inputs, ranker, directory, label)
                  for label, directory in inputs.models})
