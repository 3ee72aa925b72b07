"""Reward models (LLAMA2.md §6): a chat model with its next-token head replaced by a scalar head,
trained on preference pairs with the margin ranking loss (Eq. 2).

- The model starts from `init_from` (normally SFT or the latest RLHF stage); the scalar head
  starts at zero, so every score starts at 0 (sigmoid 0.5).
- The score is the head's output at the answer's EOS (lm/scoring.py). Each pair's two dialogues
  are two segments of one packed row, so attention never crosses them.
- Loss: -log sigmoid(r_c - r_r - m(rating)) with Table 27's margins (`margins`: small, large or
  none); the safety RM adds `safety_loss_weight` x the binary cross-entropy of sigmoid(r) against
  each answer's safe label [U].
- Mix (§6.4): the track's own pairs, all of them, plus pairs of the other track sampled uniformly
  to make `other_share` of the total (helpfulness: 0.5, an equal amount; safety: 0.1, 90/10).
- Evaluation (into metrics.json and report.md): accuracy, by rating (Table 8) and, with safety
  labels, by safety bin with unsafe-answer precision/recall at 0.15 and 0.5 (Table 29), on the
  track's own test set and on the other track's; the raw score mean and std on the own test set,
  also saved with the checkpoint as DIR/reward.json (PPO can whiten with them); the calibration
  and histogram plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random

import jax
import jax.numpy as jnp

from data_pipelines import preferences, text
from lm import (checkpoints, configs, hardware, losses, model, optim, roles, scoring,
                sharding, trainer)
from lm.evals import reward as reward_evals
from lm.stages import kit
from lm.tokenizer import Tokenizer

STATS_FILE = "reward.json"
TRACKS = ("helpful", "safety")


@dataclasses.dataclass(frozen=True)
class Data(kit.DataConfig):
  """Preference pairs. `source`: a stage that wrote preferences/<track>/{train,eval}.jsonl (the
  world), or pair JSONL (then `eval_source`, `other_source`, `other_eval_source` are paths too).
  `track`: whose pairs are this RM's own. `other_share`: the mixed-in pairs' share of the
  training set. `pairs_per_row`: 0 packs as many pairs as fit a row; 1 gives each pair its own
  row (the paper's batches count pairs: 512 pairs, 1024 sequences). `on_policy`: stages (or
  their directories) that collected pairs of a chat model's own answers (kind
  "collect_preferences"; LLAMA2.md §6.1: new batches from the latest model keep the RM on its
  distribution); their own-track training pairs join this RM's own, and their held-out pairs are
  a test set of their own (metrics prefixed "<stage>_test_"); `on_policy_repeat` times each
  (their weight against the source's pairs [U])."""

  track: str = "helpful"
  other_source: str = ""
  other_eval_source: str = ""
  other_share: float = 0.5
  pairs_per_row: int = 0
  on_policy: tuple = ()
  on_policy_repeat: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "reward"
  init_from: str = "sft"
  tokenizer: str = "tokenizer"
  data: Data = Data(source="world", seq_len=4096)
  margins: str = "small"  # Table 27: small, large, or none (Eq. 1)
  safety_loss_weight: float = 0.0  # the safety RM's auxiliary safe/unsafe term [U]
  epochs: float = 1.0  # train.steps is derived from it (the paper: 1; longer over-fitted)
  train: trainer.TrainConfig = trainer.TrainConfig(steps=1000, batch_size=512)
  # §6.5: warmup 3 % of the steps, at least 5; cosine to 10 %.
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(
      lr=1e-5, warmup_steps=5, warmup_fraction=0.03, final_lr_fraction=0.1)
  plan: str = sharding.DEFAULT_PLAN
  eval_batch_size: int = 16  # rows per scoring call


def _paths(cfg: Config, ctx) -> dict[str, str]:
  """The train, eval, other-track train and other-track eval pair files ("" when not given)."""
  where = f"stages.{ctx.name}.data"
  if cfg.data.track not in TRACKS:
    raise ValueError(f"{where}.track must be one of {TRACKS}, got {cfg.data.track!r}")
  if cfg.data.source in ctx.outputs:
    base = os.path.join(ctx.outputs[cfg.data.source], "preferences")
    other = TRACKS[1 - TRACKS.index(cfg.data.track)]
    paths = {"train": os.path.join(base, cfg.data.track, "train.jsonl"),
             "eval": os.path.join(base, cfg.data.track, "eval.jsonl"),
             "other_train": os.path.join(base, other, "train.jsonl"),
             "other_eval": os.path.join(base, other, "eval.jsonl")}
    overrides = {"eval": cfg.data.eval_source, "other_train": cfg.data.other_source,
                 "other_eval": cfg.data.other_eval_source}
    paths.update({k: v for k, v in overrides.items() if v})
  elif not cfg.data.source:
    raise ValueError(f"{where}.source is empty: give preference-pair JSONL or a stage that wrote "
                     f"preferences/")
  else:
    paths = {"train": cfg.data.source, "eval": cfg.data.eval_source,
             "other_train": cfg.data.other_source, "other_eval": cfg.data.other_eval_source}
  if not paths["eval"]:
    raise ValueError(f"{where}.eval_source is empty: a reward model is judged on held-out pairs")
  if not 0.0 <= cfg.data.other_share < 1.0:
    raise ValueError(f"{where}.other_share must be in [0, 1), got {cfg.data.other_share}")
  return paths


def _on_policy_paths(cfg: Config, ctx) -> dict[str, tuple[str, str]]:
  """stage -> (train, eval) pair files of the RM's track under its preferences/."""
  paths = {}
  if cfg.data.on_policy_repeat < 1:
    raise ValueError(f"stages.{ctx.name}.data.on_policy_repeat must be >= 1, got "
                     f"{cfg.data.on_policy_repeat}")
  for stage in cfg.data.on_policy:
    base = os.path.join(ctx.output_of(stage), "preferences", cfg.data.track)
    train, held_out = os.path.join(base, "train.jsonl"), os.path.join(base, "eval.jsonl")
    if not os.path.exists(train):
      raise ValueError(f"stages.{ctx.name}.data.on_policy: {stage!r} has no {train} (not a "
                       f"collect_preferences stage, or it has not finished)")
    paths[stage] = (train, held_out if os.path.exists(held_out) else "")
  return paths


def _read(path: str, bad: text.BadRows, needs_labels: bool) -> list:
  pairs = preferences.read_pairs(path, bad) if path else []
  if needs_labels:
    labelled = []
    for pair in pairs:
      if pair.chosen_safe is None or pair.rejected_safe is None:
        bad(pair.where, "missing label", "the safety loss needs 'chosen_safe' and "
            "'rejected_safe' on every pair of the RM's own track")
        continue
      labelled.append(pair)
    pairs = labelled
  return pairs


def mix(own: list, other: list, other_share: float, seed: int) -> list:
  """All of `own` plus a uniform sample of `other` making `other_share` of the result (all of
  `other` when there are fewer)."""
  wanted = round(len(own) * other_share / (1.0 - other_share)) if other_share else 0
  sample = random.Random(seed).sample(other, min(wanted, len(other)))
  return list(own) + sample


@dataclasses.dataclass
class Inputs:
  model_cfg: object
  init_dir: str
  tokenizer_path: str
  tokenizer: Tokenizer
  train: list  # EncodedPair, the mix
  evals: dict  # test-set name -> list of EncodedPair
  counts: dict
  bad: text.BadRows


def validate(cfg: Config, ctx) -> Inputs:
  """Reads, checks and encodes every pair before any model is loaded."""
  where = f"stages.{ctx.name}"
  if cfg.margins not in losses.RATING_MARGINS:
    raise ValueError(f"{where}.margins must be one of {sorted(losses.RATING_MARGINS)}, got "
                     f"{cfg.margins!r}")
  paths, on_policy = _paths(cfg, ctx), _on_policy_paths(cfg, ctx)
  model_cfg, init_dir, tokenizer_path = kit.chat_start(cfg, ctx, "a chat (SFT or RLHF) model")
  tokenizer = Tokenizer(tokenizer_path)
  bad = text.BadRows(cfg.data.skip_bad_rows)
  labels = cfg.safety_loss_weight > 0

  def encode(pairs):
    return preferences.encode_pairs(pairs, tokenizer.encode_dialog, cfg.data.seq_len, bad)

  own = encode(_read(paths["train"], bad, labels))
  on_policy_train, on_policy_evals = [], {}
  for stage, (train_path, eval_path) in on_policy.items():
    on_policy_train += encode(_read(train_path, bad, labels)) * cfg.data.on_policy_repeat
    on_policy_evals[os.path.basename(stage.rstrip("/"))] = encode(_read(eval_path, bad, False))
  own += on_policy_train
  other = encode(_read(paths["other_train"], bad, False))
  train = mix(own, other, cfg.data.other_share, ctx.seed)
  if not train:
    raise ValueError(f"{where}: no valid training pairs in {paths['train']}")
  own_track = cfg.data.track if cfg.data.source in ctx.outputs else "own"
  other_track = (TRACKS[1 - TRACKS.index(cfg.data.track)] if cfg.data.source in ctx.outputs
                 else "other")
  evals = {own_track: encode(_read(paths["eval"], bad, False))}
  if paths["other_eval"]:
    evals[other_track] = encode(_read(paths["other_eval"], bad, False))
  if not evals[own_track]:
    raise ValueError(f"{where}: no valid evaluation pairs in {paths['eval']}")
  evals.update({name: pairs for name, pairs in on_policy_evals.items() if pairs})
  counts = {"train_pairs": len(train), "own_pairs": len(own),
            "other_pairs": len(train) - len(own), "on_policy_pairs": len(on_policy_train)}
  return Inputs(model_cfg, init_dir, tokenizer_path, tokenizer, train, evals, counts, bad)


def training_rows(cfg: Config, encoded: list) -> dict:
  """Packed pair rows (data_pipelines.preferences.pack_pairs) with each pair's margin."""
  rows = preferences.pack_pairs(encoded, cfg.data.seq_len, cfg.data.pairs_per_row or None)
  rows["margin"] = losses.margins_for(rows["rating"], cfg.margins)
  return rows


def loss_fn(graphdef, safety_loss_weight: float) -> trainer.LossFn:
  """Packed pair rows -> the ranking loss (+ the weighted safe-label term); weight = pairs."""

  def loss(params, frozen, batch, rng):
    del frozen, rng
    values, _ = model.apply(graphdef, params, batch["tokens"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"])
    chosen = jnp.take_along_axis(values, batch["chosen_index"], axis=1)
    rejected = jnp.take_along_axis(values, batch["rejected_index"], axis=1)
    total, metrics = losses.ranking_loss(chosen, rejected, batch["margin"], batch["pair_mask"])
    metrics["ranking_loss"] = metrics["loss"]
    if safety_loss_weight:
      both = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
      aux, aux_metrics = losses.safe_label_loss(
          both(chosen, rejected), both(batch["chosen_safe"], batch["rejected_safe"]),
          both(batch["pair_mask"], batch["pair_mask"]))
      total = total + safety_loss_weight * aux
      metrics.update(safety_loss=aux, safe_label_accuracy=aux_metrics["accuracy"])
    metrics["loss"] = total
    return total, metrics

  return loss


def train_steps(cfg: Config, rows: int) -> int:
  return max(1, math.ceil(cfg.epochs * rows / cfg.train.batch_size))


def with_steps(cfg: Config, steps: int) -> Config:
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def build_trainer(cfg: Config, model_cfg, mesh, where: str) -> trainer.Trainer:
  rules = sharding.plan_rules(cfg.plan)
  graphdef, _ = model.abstract_model(model_cfg, "scalar", rules)
  return kit.build_trainer(cfg, model_cfg, mesh, where, head="scalar",
                           loss=loss_fn(graphdef, cfg.safety_loss_weight))


def evaluate_pairs(role: roles.Role, encoded: list, seq_len: int, batch_size: int
                   ) -> tuple[dict, dict]:
  """(metrics, raw scores {"chosen", "rejected", "ratings"}) of a scalar role on encoded pairs,
  through the shared scoring path: rows of `seq_len`, `batch_size` rows a call."""
  sequences = [s for pair in encoded for s in (pair.chosen, pair.rejected)]
  scores = scoring.score_sequences(role, sequences, seq_len, batch_size)
  label = lambda safe: -1 if safe is None else int(safe)  # noqa: E731
  raw = {"chosen": scores[0::2], "rejected": scores[1::2],
         "ratings": [p.pair.rating for p in encoded]}
  has_labels = any(p.pair.chosen_safe is not None for p in encoded)
  metrics = reward_evals.pair_metrics(
      raw["chosen"], raw["rejected"], raw["ratings"],
      [label(p.pair.chosen_safe) for p in encoded] if has_labels else None,
      [label(p.pair.rejected_safe) for p in encoded] if has_labels else None)
  return metrics, raw


def _evaluation(cfg: Config, inputs: Inputs, role: roles.Role, last: dict):
  """params -> metrics on the own test set (flat) and, prefixed by its name, the other's; the
  last call's full results stay in `last` for the report."""
  names = list(inputs.evals)

  def evaluate(params) -> dict:
    scored = role.with_params(params)
    last.clear()
    result = {}
    for i, name in enumerate(names):
      metrics, raw = evaluate_pairs(scored, inputs.evals[name], cfg.data.seq_len,
                                    cfg.eval_batch_size)
      last[name] = (metrics, raw)
      prefix = "" if i == 0 else f"{name}_test_"
      result.update({f"{prefix}{k}": v for k, v in metrics.items()})
    return result

  return evaluate


def _report(ctx, last: dict) -> str:
  label = lambda name: f"{ctx.name}, {name} test set"  # noqa: E731
  results = {label(name): metrics for name, (metrics, _) in last.items()}
  own, (_, raw) = next(iter(last.items()))
  reward_evals.plot_scores(raw["chosen"], raw["rejected"], raw["ratings"],
                           os.path.join(ctx.directory, "scores.png"),
                           f"{ctx.name}: scores on the {own} test set")
  parts = ["### Reward model accuracy by rating (Table 8's shape)\n",
           reward_evals.rating_table(results)]
  safety = {k: m for k, m in results.items() if "accuracy_by_safety_bin" in m}
  if safety:
    parts += ["\n### By safety bin, and unsafe-answer detection (Table 29's shape)\n",
              reward_evals.safety_table(safety)]
  parts.append(f"\n![scores by rating and their histogram]({ctx.name}/scores.png)\n")
  return "\n".join(parts)


def run(cfg: Config, ctx, log=print) -> dict:
  where = f"stages.{ctx.name}"
  inputs = validate(cfg, ctx)
  rows = training_rows(cfg, inputs.train)
  cfg = with_steps(cfg, train_steps(cfg, rows["tokens"].shape[0]))
  mesh = ctx.mesh()
  tr = build_trainer(cfg, inputs.model_cfg, mesh, where)
  data = text.PackedBatches(rows, text.PackingConfig(
      cfg.data.seq_len, tr.cfg.batch_size, ctx.seed, tr.process_rows(tr.cfg.batch_size)))
  rm = roles.load("reward", inputs.init_dir, mesh, head="scalar", plan=cfg.plan, trainable=True)
  checkpoints.write_model_info(ctx.directory, inputs.model_cfg, "scalar", inputs.tokenizer_path)
  last: dict = {}
  result = kit.train(tr, ctx, inputs.model_cfg, params=rm.params, data=data,
                     evaluate=_evaluation(cfg, inputs, rm, last), seq_len=cfg.data.seq_len,
                     log=log)
  if result.get("preempted"):
    return result
  own_metrics = next(iter(last.values()))[0]
  stats = {"score_mean": own_metrics["score_mean"], "score_std": own_metrics["score_std"],
           "track": cfg.data.track, "margins": cfg.margins, "test_pairs": own_metrics["pairs"]}
  stats.update({k: v for k, v in own_metrics.items() if k.startswith("unsafe_")})
  checkpoints.write_atomically(os.path.join(ctx.directory, STATS_FILE),
                               json.dumps(stats, indent=2) + "\n")
  checkpoints.write_atomically(os.path.join(ctx.directory, "report.md"), _report(ctx, last))
  result.update(inputs.counts, packed_rows=rows["tokens"].shape[0], train_steps=tr.cfg.steps,
                **kit.dropped(inputs.bad))
  return result


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  """The test-set metrics of any scalar model directory (`lm eval`)."""
  inputs = validate(cfg, ctx)
  role = roles.load("reward", model_dir, ctx.mesh(), head="scalar", plan=cfg.plan)
  return _evaluation(cfg, inputs, role, {})(role.params)


def train_step_program(cfg: Config, model_cfg, mesh):
  """(jitted step, abstract (state, batch), model FLOPs per step) of the reward step, for
  `lm aot`: `train.batch_size` rows of `pairs_per_row` pairs (at least 1)."""
  tr = build_trainer(cfg, model_cfg, mesh, "aot")
  state = tr.abstract_state(model.abstract_params(model_cfg, mesh, tr.rules, head="scalar"))
  rows, width = (tr.cfg.batch_size, cfg.data.seq_len), (tr.cfg.batch_size,
                                                        max(1, cfg.data.pairs_per_row))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=tr.batch_sharding(len(shape)))
  batch = {k: spec(rows, jnp.int32) for k in ("tokens", "segment_ids", "positions")}
  batch.update({k: spec(width, jnp.int32) for k in (
      "chosen_index", "rejected_index", "rating", "is_safety", "chosen_safe", "rejected_safe")})
  batch.update({k: spec(width, jnp.float32) for k in ("pair_mask", "margin")})
  step = tr.jit_step(jax.tree.map(lambda a: a.sharding, state), batch)
  flops = hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers,
                                   cfg.data.seq_len, model_cfg.dim) * rows[0] * rows[1]
  return step, (state, batch, None), flops


PROGRAMS = {"train step": train_step_program}
