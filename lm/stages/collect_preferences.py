"""On-policy preference pairs (LLAMA2.md §6.1): the latest chat model answers the RLHF prompts,
an annotator rates pairs of its answers, and the reward models retrain on them, so they keep
judging the distribution the policy now produces (the paper collected a new batch each week
from the newest Llama 2-Chat and retrained the RMs before every RLHF version).

1. `init_from` (the latest chat model) answers every prompt `sampling.samples_per_prompt` times
   through the rollout path, in chunks saved as they finish (DIR/samples/{train,eval}/): a stage
   killed while sampling resumes at the next chunk with the samples an uninterrupted run draws.
2. The annotator grades each finished, non-empty answer; per prompt two distinct answers of
   different grades become a pair, the higher chosen, rated by the grade gap
   (`annotator="world"`: data_pipelines/world/annotator.py, the synthetic world's rater; the
   only one here: people's ratings come in as pair JSONL, read by the reward stage directly).
3. Pairs go to DIR/preferences/{helpful,safety}/{train,eval}.jsonl, the layout the reward stage
   reads (`data.on_policy`); adversarial prompts' pairs are the safety track's, with safe labels.
4. `judges` (the RMs in use) score the held-out pairs: their accuracy on the policy's own
   answers, against which the retrained RMs' accuracy on the same pairs is read.

Metrics: pairs by track, split and rating; prompts whose answers all got one grade (no pair);
the grade kinds of every sample (what the model does, by the annotator's eye); sampling time and
tokens/s; the judges' accuracy.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random

import jax

from data_pipelines import preferences, text
from data_pipelines.world import annotator as world_annotator
from lm import checkpoints, roles, sampling, sharding
from lm.evals import reward as reward_evals
from lm.stages import kit, reward, self_distill
from lm.stages.best_of_k import answer_text, chunked_samples
from lm.stages.prompt_sources import prompt_file
from lm.stages.rejection_sampling import Reward
from lm.tokenizer import Tokenizer

ANNOTATORS = ("world",)
SPLITS = ("train", "eval")
TRACKS = reward.TRACKS


@dataclasses.dataclass(frozen=True)
class Data:
  """Prompts ({"prompt" or "messages", "is_safety", "category", "answer"}): `source` a stage that
  wrote prompts/{train,eval}.jsonl (the world) or JSONL, `eval_source` the held-out prompts
  (default the source's prompts/eval.jsonl); `max_prompts` / `max_eval_prompts` > 0 keep the
  first that many. `eval_fraction` > 0 holds out the last fraction of the training prompts
  instead (pairs about what the RMs are trained on and RS ranks, but never trained on), and
  `eval_source` is not read."""

  source: str = "world"
  eval_source: str = ""
  max_prompts: int = 0
  max_eval_prompts: int = 0
  eval_fraction: float = 0.0
  skip_bad_rows: bool = False


@dataclasses.dataclass(frozen=True)
class Sampling:
  samples_per_prompt: int = 4  # more answers make a prompt with two different grades likelier
  temperature: float = 1.0
  top_p: float = 1.0
  max_new_tokens: int = 512
  batch_size: int = 64  # rows per generate call
  chunk_prompts: int = 256  # prompts per saved chunk


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "collect_preferences"
  init_from: str = "sft"  # the chat model whose answers are rated
  tokenizer: str = "tokenizer"
  annotator: str = "world"
  data: Data = Data()
  sampling: Sampling = Sampling()
  # The RMs in use, judged on the held-out pairs; helpful="" judges none (then the safety RM is
  # not read either).
  judges: Reward = Reward()
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"
  rollout_dtype: str = ""  # "bfloat16": generate with bf16 weights and KV cache (kit.rollout_role)


@dataclasses.dataclass
class Inputs:
  init_dir: str
  tokenizer: Tokenizer
  prompts: dict  # split -> list of data_pipelines.preferences.Prompt


def validate(cfg: Config, ctx) -> Inputs:
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
  if cfg.annotator not in ANNOTATORS:
    raise ValueError(f"{where}.annotator must be one of {ANNOTATORS}, got {cfg.annotator!r} "
                     f"(people's ratings are pair JSONL: give them to the reward stage)")
  if cfg.sampling.samples_per_prompt < 2 or cfg.sampling.chunk_prompts < 1:
    raise ValueError(f"{where}.sampling: samples_per_prompt must be >= 2 (a pair needs two "
                     f"answers) and chunk_prompts >= 1")
  _, init_dir, tokenizer_path = kit.chat_start(cfg, ctx, "a chat (SFT or RLHF) model")
  bad = text.BadRows(cfg.data.skip_bad_rows)
  if not 0.0 <= cfg.data.eval_fraction < 1.0:
    raise ValueError(f"{where}.data.eval_fraction must be in [0, 1), got "
                     f"{cfg.data.eval_fraction}")
  train = preferences.read_prompts(prompt_file(cfg, ctx, "train"), bad)[
      :cfg.data.max_prompts or None]
  if cfg.data.eval_fraction:
    held_out = max(1, round(len(train) * cfg.data.eval_fraction))
    prompts = {"train": train[:-held_out], "eval": train[-held_out:]}
  else:
    prompts = {"train": train, "eval": preferences.read_prompts(
        prompt_file(cfg, ctx, "eval"), bad)[:cfg.data.max_eval_prompts or None]}
  for split, rows in prompts.items():
    gradable = [p for p in rows if p.is_safety or p.answer]
    if not gradable:
      raise ValueError(f"{where}.data: no {split} prompt the annotator can grade (each needs "
                       f"'is_safety' or a ground-truth 'answer'), of {len(rows)} read")
  return Inputs(init_dir, Tokenizer(tokenizer_path), prompts)


def annotate(prompts, answers, tokenizer: Tokenizer, seed: int) -> tuple[dict, dict]:
  """Grades every answer and draws one pair per prompt.

  Args:
    prompts: [P] Prompt.
    answers: [P][K] {"tokens", "finished"}.
  Returns:
    ({"helpful": [pair row], "safety": [pair row]}, counts) with rows in the world's pair format
    (messages, chosen, rejected, rating, is_safety, safe labels on the safety track, kinds).
  """
  pairs = {track: [] for track in TRACKS}
  kinds, counts = collections.Counter(), collections.Counter()
  for index, (prompt, group) in enumerate(zip(prompts, answers)):
    question = prompt.messages[-1]["content"]
    graded = []
    for answer in group:
      reply = answer_text(tokenizer, answer)
      if not answer["finished"] or not reply:
        counts["unfinished_or_empty"] += 1
        continue
      judged = world_annotator.grade(question, prompt.is_safety, prompt.category, prompt.answer,
                                     reply)
      if judged is None:
        counts["ungradable"] += 1
        continue
      kinds[("safety" if prompt.is_safety else "helpful", judged[0])] += 1
      graded.append((reply, judged))
    pair = world_annotator.pair_from_replies(graded, random.Random(seed * 1_000_003 + index))
    if pair is None:
      counts["prompts_without_pair"] += 1
      continue
    track = "safety" if prompt.is_safety else "helpful"
    pairs[track].append({"messages": list(prompt.messages), "is_safety": prompt.is_safety,
                         "category": prompt.category, **pair})
  counts.update({f"kind_{track}_{kind}": n for (track, kind), n in kinds.items()})
  return pairs, dict(counts)


def _judge(cfg: Config, ctx, inputs: Inputs, pairs: dict) -> dict:
  """The judges' accuracy (by rating) on the held-out pairs of their own track."""
  references = {"helpful": cfg.judges.helpful, "safety": cfg.judges.safety}
  if not cfg.judges.helpful:
    return {}
  bad = text.BadRows(False)
  metrics = {}
  for track, reference in references.items():
    rows = [preferences.pair_from_row(f"{track}:{i}", row, bad)
            for i, row in enumerate(pairs[track])]
    encoded = preferences.encode_pairs([r for r in rows if r], inputs.tokenizer.encode_dialog,
                                       cfg.judges.seq_len, bad)
    if not reference or not encoded:
      continue
    judge = roles.load(reference, ctx.output_of(reference), ctx.mesh(), head="scalar",
                       plan=cfg.plan, dtype=cfg.judges.dtype or None)
    scored, _ = reward.evaluate_pairs(judge, encoded, cfg.judges.seq_len, cfg.judges.batch_size)
    metrics.update({f"judge_{track}_{k}": v for k, v in scored.items()
                    if not isinstance(v, dict)})
    metrics[f"judge_{track}_model"] = reference
    metrics[f"judge_{track}_by_rating"] = scored["accuracy_by_rating"]
  return metrics


def _report(ctx, metrics: dict) -> str:
  lines = [f"### {ctx.name}: pairs of {metrics['model']}'s own answers, rated by the "
           f"{metrics['annotator']} annotator\n",
           "| track | train pairs | held-out pairs | answers by grade (train and held out) |",
           "|---|---|---|---|"]
  for track in TRACKS:
    grades = ", ".join(f"{k.removeprefix(f'kind_{track}_')} {v}" for k, v in sorted(
        metrics.items()) if k.startswith(f"kind_{track}_"))
    lines.append(f"| {track} | {metrics[f'{track}_train_pairs']} | "
                 f"{metrics[f'{track}_eval_pairs']} | {grades} |")
  judged = {f"{metrics[f'judge_{t}_model']} on {t} pairs": {
      "accuracy": metrics[f"judge_{t}_accuracy"], "pairs": metrics[f"judge_{t}_pairs"],
      "accuracy_by_rating": metrics[f"judge_{t}_by_rating"]}
      for t in TRACKS if f"judge_{t}_accuracy" in metrics}
  if judged:
    lines += ["\nThe RMs in use, on the held-out pairs of the policy's own answers:\n",
              reward_evals.rating_table(judged)]
  return "\n".join(lines) + "\n"


def run(cfg: Config, ctx, log=print) -> dict:
  inputs = validate(cfg, ctx)
  policy = kit.rollout_role(roles.load("policy", inputs.init_dir, ctx.mesh(), head="lm",
                                       plan=cfg.plan),
                            cfg.rollout_plan, cfg.rollout_dtype)
  s = cfg.sampling
  sampling_cfg = sampling.SamplingConfig(temperature=s.temperature, top_p=s.top_p,
                                         max_new_tokens=s.max_new_tokens,
                                         eos_id=inputs.tokenizer.eos_id)
  stats: dict = {}
  pairs, metrics = {track: {} for track in TRACKS}, collections.Counter()
  for offset, split in enumerate(SPLITS):
    prompts = inputs.prompts[split]
    log(f"stages.{ctx.name}: {s.samples_per_prompt} answers to each of {len(prompts)} {split} "
        f"prompts from {cfg.init_from} at T={s.temperature}")
    tokens = [inputs.tokenizer.encode_dialog(list(p.messages)).tokens.tolist() for p in prompts]
    answers = chunked_samples(policy, tokens, s.samples_per_prompt, sampling_cfg,
                              ctx.seed + offset, s.chunk_prompts, s.batch_size,
                              os.path.join(ctx.directory, "samples", split), log, stats)
    split_pairs, counts = annotate(prompts, answers, inputs.tokenizer, ctx.seed + offset)
    metrics.update(counts)
    for track, rows in split_pairs.items():
      os.makedirs(os.path.join(ctx.directory, "preferences", track), exist_ok=True)
      pairs[track][split] = rows
      metrics[f"{track}_{split}_pairs"] = len(rows)
      self_distill.write_jsonl(
          os.path.join(ctx.directory, "preferences", track, f"{split}.jsonl"), rows)
      for rating in (r["rating"] for r in rows):
        metrics[f"{track}_{split}_{rating.replace(' ', '_')}"] += 1
  del policy
  result = dict(metrics, model=cfg.init_from, annotator=cfg.annotator,
                samples_per_prompt=s.samples_per_prompt, temperature=s.temperature,
                sampling_seconds=stats.get("sampling_seconds", 0.0),
                sampling_tokens_per_second=stats.get("sampled_tokens", 0) / max(
                    stats.get("sampling_seconds", 0.0), 1e-9))
  result.update(_judge(cfg, ctx, inputs, {t: pairs[t]["eval"] for t in pairs}))
  checkpoints.write_atomically(os.path.join(ctx.directory, "report.md"), _report(ctx, result))
  log(f"stages.{ctx.name}: {result['helpful_train_pairs']} helpful and "
      f"{result['safety_train_pairs']} safety pairs to train on")
  return {k: v for k, v in result.items() if not k.endswith("_by_rating")}


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  """The accuracy of a scalar model directory on the collected held-out pairs (`lm eval`), on
  both tracks."""
  inputs = validate(cfg, ctx)
  pairs = {track: self_distill.read_jsonl(os.path.join(ctx.directory, "preferences", track,
                                                       "eval.jsonl")) for track in TRACKS}
  judges = dataclasses.replace(cfg.judges, helpful=model_dir, safety=model_dir)
  return _judge(dataclasses.replace(cfg, judges=judges), ctx, inputs, pairs)



def sampling_program(cfg: Config, model_cfg, mesh):
  """One rollout call for `lm aot`: `sampling.batch_size` rows at the longest prompt the RMs'
  rows leave room for, on the rollout plan."""
  budget = min(cfg.judges.seq_len, 2 * model_cfg.max_seq_len) - cfg.sampling.max_new_tokens
  return kit.sampling_program(
      model_cfg, mesh, cfg.rollout_plan,
      sampling.SamplingConfig(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                              max_new_tokens=cfg.sampling.max_new_tokens),
      cfg.sampling.batch_size, budget)


PROGRAMS = {"sampling": sampling_program}
