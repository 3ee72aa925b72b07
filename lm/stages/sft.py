"""Supervised fine-tuning on chat dialogues (LLAMA2.md §4).

Loss on assistant tokens only (every assistant turn, and its EOS), examples packed whole with
segment masking so neither attention nor loss crosses examples. The paper's recipe is the default
for the real sizes: LR 2e-5 cosine, weight decay 0.1, batch 64, seq 4096, 2 epochs.

Config (`Config`): init_from (an earlier stage or model directory), tokenizer, data (source: an
earlier stage that wrote sft/ data, e.g. "world", a path of dialogue JSONL, or "tfds:NAME[@SPLIT]"
of a dialogues dataset under data_dir (data_pipelines/tfds_sources.py); eval_source; seq_len;
eval_batches; skip_bad_rows), safety_data, safety_fraction and safety_preprompt (safety
demonstrations mixed into the training split, §8.2), train, optimizer, z_loss, plan,
rollout_plan. The model is the one in init_from (`lm aot` follows init_from through the
experiment to find its shape).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random

from data_pipelines import chat as chat_data
from data_pipelines import text
from data_pipelines.world import safety as world_safety
from lm import checkpoints, optim, roles, sharding, trainer
from lm.evals import chat as chat_evals
from lm.stages import kit
from lm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "sft"
  init_from: str = "pretrain"
  tokenizer: str = "tokenizer"
  data: kit.DataConfig = kit.DataConfig(source="world", seq_len=4096)
  train: trainer.TrainConfig = trainer.TrainConfig(steps=1000, batch_size=64)
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(lr=2e-5, warmup_steps=0,
                                                           final_lr_fraction=0.0)
  z_loss: float = 0.0
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"
  # > 0: train this many passes over the packed rows, overriding train.steps (the paper: 2).
  epochs: float = 0.0
  # Safety demonstrations (§8.2) added to the training split: a stage that wrote
  # sft/safety.jsonl (the world) or dialogue JSONL; "" for none. `safety_fraction` of them are
  # used, drawn at random (§8.3's scaling ablation varies it from 0 to 1).
  safety_data: str = ""
  safety_fraction: float = 1.0
  # "generic": each safety demonstration that refuses gets one of the source's generic safety
  # preprompts (safety/preprompts.json) as its system message, drawn with the seed [U]; the
  # helpful answers to look-alikes stay bare, so the preprompt, not the trigger words, is what
  # tells refusing from helping. A model that is safe with a preprompt and less so without: the
  # state context distillation starts from (§8.4).
  safety_preprompt: str = ""


def train_steps(cfg: Config, packed_rows: int) -> int:
  """Optimizer steps: `epochs` passes over the packed rows (several examples share a row), or
  train.steps when epochs is 0."""
  if cfg.epochs <= 0:
    return cfg.train.steps
  return max(1, math.ceil(cfg.epochs * packed_rows / cfg.train.batch_size))


def _source(cfg: Config, ctx, split: str) -> str:
  if cfg.data.source in ctx.outputs:
    return os.path.join(ctx.outputs[cfg.data.source], "sft", f"{split}.jsonl")
  if not cfg.data.source:
    raise ValueError(f"stages.{ctx.name}.data.source is empty: give dialogue JSONL files")
  return cfg.data.source if split == "train" else (cfg.data.eval_source or cfg.data.source)


def safety_dialogues(cfg, ctx, bad: text.BadRows, preprompt: str = "") -> list:
  """`safety_fraction` of the safety demonstrations of `cfg` (SFT's or GAtt's config),
  [(where, messages)], drawn with the seed; when `preprompt` is "generic" (SFT's
  `safety_preprompt`) those whose last reply refuses (the world's refusal phrasings) are put
  behind a generic preprompt."""
  if not cfg.safety_data:
    return []
  where = f"stages.{ctx.name}"
  if not 0.0 <= cfg.safety_fraction <= 1.0:
    raise ValueError(f"{where}.safety_fraction must be in [0, 1], got {cfg.safety_fraction}")
  path = (os.path.join(ctx.outputs[cfg.safety_data], "sft", "safety.jsonl")
          if cfg.safety_data in ctx.outputs else cfg.safety_data)
  if not os.path.exists(path):
    raise ValueError(f"{where}.safety_data: {path} does not exist")
  dialogues = list(chat_data.read_dialogues(path, bad))
  rng = random.Random(ctx.seed)
  drawn = rng.sample(dialogues, round(cfg.safety_fraction * len(dialogues)))
  if preprompt not in ("", "generic"):
    raise ValueError(f'{where}.safety_preprompt must be "" or "generic", got {preprompt!r}')
  if not preprompt:
    return drawn
  if cfg.safety_data not in ctx.outputs:
    raise ValueError(f"{where}.safety_preprompt needs safety_data to name a stage that wrote "
                     f"safety/preprompts.json (the world), not a file")
  generic = json.load(open(os.path.join(ctx.outputs[cfg.safety_data], "safety",
                                        "preprompts.json")))["generic"]
  dialogues = []
  for where_row, messages in drawn:
    turns = [m for m in messages if m["role"] != "system"]
    if world_safety.is_refusal(turns[-1]["content"]):
      turns = [{"role": "system", "content": rng.choice(generic)}] + turns
    dialogues.append((where_row, turns))
  return dialogues


def packed(cfg: Config, ctx, tokenizer: Tokenizer, split: str):
  """The split's dialogues encoded (loss on answers) and packed into rows, the safety
  demonstrations added to the training split; (rows, (report, bad))."""
  report, bad = chat_data.PackReport(), text.BadRows(cfg.data.skip_bad_rows)
  source = _source(cfg, ctx, split)
  if source.startswith("tfds:"):
    from data_pipelines import tfds_sources  # imports TFDS only for TFDS sources
    dialogues = tfds_sources.dialogues(*tfds_sources.parse_source(source, split),
                                       cfg.data.data_dir or None)
  else:
    dialogues = chat_data.read_dialogues(source, bad)
  if split == "train":
    safety = safety_dialogues(cfg, ctx, bad, cfg.safety_preprompt)
    report.mixed_in = len(safety)
    dialogues = itertools.chain(dialogues, safety)
  examples = chat_data.encode_examples(dialogues, tokenizer.encode_dialog, cfg.data.seq_len, bad)
  return chat_data.pack_examples(examples, cfg.data.seq_len, report), (report, bad)


def world_questions(source: str, ctx) -> list[dict] | None:
  """Held-out questions with answers, when the data source is a stage that wrote them."""
  if source in ctx.outputs:
    path = os.path.join(ctx.outputs[source], "sft", "questions.jsonl")
    if os.path.exists(path):
      return chat_evals.load_questions(path)
  return None


def answer_evals(questions, tokenizer: Tokenizer, rollout_plan: str):
  """role -> answer accuracy and stop-at-EOS on held-out questions, generated on the rollout plan."""
  if not questions:
    return lambda role: {}
  return lambda role: chat_evals.answer_metrics(kit.rollout_role(role, rollout_plan), tokenizer,
                                                questions)


def _evaluation(cfg: Config, ctx, tokenizer, role: roles.Role, tr: trainer.Trainer):
  eval_rows, _ = packed(cfg, ctx, tokenizer, "eval")
  batches = text.fixed_batches(eval_rows, tr.cfg.batch_size, cfg.data.eval_batches,
                               tr.process_rows(tr.cfg.batch_size))
  extra = answer_evals(world_questions(cfg.data.source, ctx), tokenizer, cfg.rollout_plan)
  return kit.make_evaluate(role, [tr.put_batch(b) for b in batches], extra)


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  role = roles.load("model", model_dir, ctx.mesh(), head="lm", plan=cfg.plan)
  tokenizer = Tokenizer(kit.resolve_tokenizer(cfg.tokenizer, ctx))
  tr = kit.build_trainer(cfg, role.model_cfg, role.mesh, f"stages.{ctx.name}")
  return _evaluation(cfg, ctx, tokenizer, role, tr)(role.params)


def run(cfg: Config, ctx) -> dict:
  where = f"stages.{ctx.name}"
  model_cfg, init_dir, tokenizer_path = kit.chat_start(cfg, ctx, "a pretrained model")
  tokenizer = Tokenizer(tokenizer_path)
  mesh = ctx.mesh()
  train_rows, (report, bad) = packed(cfg, ctx, tokenizer, "train")
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, steps=train_steps(cfg, report.rows)))
  tr = kit.build_trainer(cfg, model_cfg, mesh, where)
  data = text.PackedBatches(train_rows, text.PackingConfig(
      cfg.data.seq_len, tr.cfg.batch_size, ctx.seed, tr.process_rows(tr.cfg.batch_size)))
  policy = roles.load("policy", init_dir, mesh, head="lm", plan=cfg.plan, trainable=True)
  evaluate_fn = _evaluation(cfg, ctx, tokenizer, policy, tr)
  checkpoints.write_model_info(ctx.directory, model_cfg, "lm", tokenizer_path)
  # The starting model's scores, so the report shows what fine-tuning changed.
  before = {f"{k}_before": v for k, v in evaluate_fn(policy.params).items()
            if k in ("answer_accuracy", "stop_at_eos", "loss")}
  result = kit.train(tr, ctx, model_cfg, params=policy.params, data=data, evaluate=evaluate_fn,
                     seq_len=cfg.data.seq_len)
  result.update(before)
  result.update(packed_examples=report.examples, packed_rows=report.rows, row_fill=report.fill,
                safety_examples=report.mixed_in, train_steps=tr.cfg.steps,
                **kit.dropped(bad))
  return result


PROGRAMS = {"train step": kit.train_step_program}
