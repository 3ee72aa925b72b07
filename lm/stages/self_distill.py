"""Generate -> filter -> fine-tune: the skeleton of GAtt, rejection sampling and context
distillation (the stages that make their training data with a model and then train on it).

A stage supplies a `Distillation`: how to generate (and filter) its rows with the starting model,
how to encode a row for the loss, and its generation-based evaluation. The skeleton does the rest
the same way for all of them:
1. the starting model is loaded as the trainable `policy` on the training plan, and generation
   runs on a copy laid out by the rollout plan (`rollout_plan`);
2. the generated rows are written to DIR/<data_file> with their counts, and reused when the stage
   resumes (generation is never repeated, so a resumed run trains on the same data);
3. the evaluation runs before training (cached in DIR/before.json) and after;
4. a held-out share of the rows (`data.eval_fraction`) gives the eval loss, the rest is packed
   and trained on with the next-token step (lm/stages/kit.py).
Config fields it reads: plan, rollout_plan, data (seq_len, eval_batches, eval_fraction), train,
optimizer, z_loss.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Protocol

import numpy as np

from data_pipelines import chat as chat_data
from data_pipelines import text
from lm import checkpoints, roles
from lm.stages import common, kit
from lm.tokenizer import EncodedDialog

BEFORE_FILE = "before.json"


class Distillation(Protocol):
  data_file: str  # the generated rows, {"messages": [...], ...} per line

  def generate(self, policy: roles.Role, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """(rows to train on, counts of what was generated and kept) from the rollout-plan policy."""

  def encode(self, messages: list[dict]) -> EncodedDialog:
    """A row's tokens and loss mask."""

  def evaluate(self, policy: roles.Role, when: str) -> dict:
    """Generation-based metrics of a (rollout-plan) policy, `when` "before" or "after"
    training: flat numbers, lists allowed."""


def write_jsonl(path: str, rows: list[dict]) -> None:
  checkpoints.write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in open(path) if line.strip()]


def cached(path: str, make: Callable[[], object]):
  """JSON at `path` if a run already wrote it, else `make()` written there atomically."""
  if os.path.exists(path):
    return json.load(open(path))
  value = make()
  checkpoints.write_atomically(path, json.dumps(value, indent=1) + "\n")
  return value


def generated_rows(stage: Distillation, ctx, policy: roles.Role, log) -> tuple[list[dict], dict]:
  """The stage's generated rows, made once: a resumed stage reads them back."""
  data_path = os.path.join(ctx.directory, stage.data_file)
  counts_path = data_path + ".counts.json"
  if os.path.exists(data_path) and os.path.exists(counts_path):
    log(f"stages.{ctx.name}: reusing the generated data {data_path}")
    return read_jsonl(data_path), json.load(open(counts_path))
  start = time.perf_counter()
  rows, counts = stage.generate(policy, log)
  # Generation-heavy stages show rollout time apart from the update's (the progress line).
  counts["generation_seconds"] = time.perf_counter() - start
  if counts.get("generated_tokens"):
    counts["generation_tokens_per_second"] = counts["generated_tokens"] / counts[
        "generation_seconds"]
  write_jsonl(data_path, rows)
  checkpoints.write_atomically(counts_path, json.dumps(counts, indent=2) + "\n")
  return rows, counts


def run(cfg, ctx: common.StageContext, stage: Distillation, init_dir: str, tokenizer_path: str,
        log=print) -> tuple[dict, dict, dict]:
  """Runs the skeleton; returns (training result, metrics before, metrics after). The result
  holds `preempted` when SIGTERM stopped training (then before and after are empty)."""
  where = f"stages.{ctx.name}"
  mesh = ctx.mesh()
  policy = roles.load("policy", init_dir, mesh, head="lm", plan=cfg.plan, trainable=True)
  tr = kit.build_trainer(cfg, policy.model_cfg, mesh, where)
  checkpoints.write_model_info(ctx.directory, policy.model_cfg, "lm", tokenizer_path)

  def for_rollout(role: roles.Role) -> roles.Role:
    return kit.rollout_role(role, cfg.rollout_plan, cfg.rollout_dtype)

  sampler = for_rollout(policy)  # one rollout copy for the generation and the "before" metrics
  rows, counts = generated_rows(stage, ctx, sampler, log)
  if not rows:
    raise ValueError(f"{where}: no example survived generation and filtering ({counts}); "
                     f"there is nothing to fine-tune on")
  before = cached(os.path.join(ctx.directory, BEFORE_FILE),
                  lambda: stage.evaluate(sampler, "before"))
  del sampler  # not held through training

  held_out = max(1, int(len(rows) * cfg.data.eval_fraction))
  order = np.random.default_rng(ctx.seed).permutation(len(rows))
  split = {"eval": [rows[i] for i in order[:held_out]],
           "train": [rows[i] for i in order[held_out:]]}
  # Generated rows, not a user's: one longer than a training row is dropped and counted.
  bad = text.BadRows(skip=True)
  reports = {name: chat_data.PackReport() for name in split}
  packed = {name: chat_data.pack_examples(chat_data.encode_examples(
      [(f"{stage.data_file}:{name}:{i}", r["messages"]) for i, r in enumerate(split[name])],
      stage.encode, cfg.data.seq_len, bad), cfg.data.seq_len, reports[name]) for name in split}
  process_rows = tr.process_rows(tr.cfg.batch_size)
  data = text.PackedBatches(packed["train"], text.PackingConfig(
      cfg.data.seq_len, tr.cfg.batch_size, ctx.seed, process_rows))
  batches = text.fixed_batches(packed["eval"], tr.cfg.batch_size, cfg.data.eval_batches,
                               process_rows)
  after: dict = {}

  def evaluate_after(role: roles.Role) -> dict:
    after.clear()
    after.update(stage.evaluate(for_rollout(role), "after"))
    return after

  evaluate = kit.make_evaluate(policy, [tr.put_batch(b) for b in batches], evaluate_after)
  result = kit.train(tr, ctx, policy.model_cfg, params=policy.params, data=data,
                     evaluate=evaluate, seq_len=cfg.data.seq_len, log=log)
  if result.get("preempted"):
    return result, {}, {}
  result.update({f"{k}_before": v for k, v in before.items()})
  result.update({f"data_{k}": v for k, v in counts.items()}, train_examples=reports["train"].examples,
                packed_rows=reports["train"].rows, **kit.dropped(bad))
  return result, before, after
