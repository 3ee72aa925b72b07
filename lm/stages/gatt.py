"""Ghost Attention (LLAMA2.md §5): teach the chat model to keep a system instruction for a whole
dialogue, by generating data with the current model and fine-tuning on it (on the
generate -> filter -> fine-tune skeleton, lm/stages/self_distill.py).

1. Each multi-turn dialogue of the source gets a random instruction from the bank (constraints
   from different families combined; a terse phrasing half the time).
2. The instruction is appended to every user turn and the current model samples every assistant
   turn (batched, turn by turn, its own replies in the history), `samples_per_dialogue` times.
3. Training examples keep the instruction only as the system message, drop it from the user
   turns, and put the loss on the last assistant turn only (zero on every earlier token,
   assistant turns included). One example per turn of each dialogue by default [U]; replies that
   break the instruction or never reach EOS are left out by default [U] (the paper samples "like
   rejection sampling" without saying how); of several samples of a dialogue, the first that
   qualifies gives the turn's example.
4. The model is fine-tuned on them; adherence by turn is measured before and after with the
   instructions' checkers, written to metrics.json, report.md (a Table 30 shaped table) and
   adherence.png.

The generated dataset is saved as DIR/gatt_data.jsonl (reused when the stage resumes), the
sampled and evaluated conversations as DIR/samples.jsonl and DIR/adherence_{before,after}.jsonl.
Config: `Config` below.
"""

from __future__ import annotations

import dataclasses
import os
import random

import jax
import numpy as np

from data_pipelines import chat as chat_data
from data_pipelines import instructions as instructions_lib
from data_pipelines import text
from data_pipelines.text import DataError
from lm import checkpoints, configs, optim, roles, rollout, sampling, sharding, trainer
from lm.evals import adherence
from lm.roles import Role
from lm.stages import kit, self_distill, sft
from lm.tokenizer import Tokenizer

DATA_FILE = "gatt_data.jsonl"


@dataclasses.dataclass(frozen=True)
class Data(kit.DataConfig):
  """The multi-turn dialogues to sample (`source`: a stage that wrote gatt/ data, or dialogue
  JSONL), the instruction bank (`instructions`: a JSONL bank, default the source's or the
  built-in families) and how examples are made."""

  instructions: str = ""
  max_constraints: int = 3
  terse_fraction: float = 0.5
  examples: str = "every_turn"  # or "last_turn"
  keep_only_adherent: bool = True
  eval_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.6
  top_p: float = 0.9
  max_new_tokens: int = 512
  batch_size: int = 64
  samples_per_dialogue: int = 1


@dataclasses.dataclass(frozen=True)
class Eval:
  """The adherence evaluation set (`source`: JSONL, default the data source's gatt/eval.jsonl),
  played greedily."""

  source: str = ""
  max_new_tokens: int = 512
  batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "gatt"
  init_from: str = "sft"
  tokenizer: str = "tokenizer"
  data: Data = Data(source="world", seq_len=4096)
  sampling: Sampling = Sampling()
  eval: Eval = Eval()
  train: trainer.TrainConfig = trainer.TrainConfig(steps=500, batch_size=64)
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(lr=2e-5, warmup_steps=0,
                                                           final_lr_fraction=0.0)
  z_loss: float = 0.0
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"
  rollout_dtype: str = ""  # "bfloat16": generate with bf16 weights and KV cache (kit.rollout_role)
  # Safety demonstrations replayed beside the generated dialogues [U], as SFT reads them
  # (`sft.safety_dialogues`): GAtt's dialogues hold no adversarial prompt, and a model
  # fine-tuned on them alone forgets its refusals.
  safety_data: str = ""
  safety_fraction: float = 1.0


def _world_file(cfg: Config, ctx, relative: str) -> str | None:
  if cfg.data.source in ctx.outputs:
    path = os.path.join(ctx.outputs[cfg.data.source], relative)
    return path if os.path.exists(path) else None
  return None


def _bank(cfg: Config, ctx) -> list[instructions_lib.Constraint]:
  path = cfg.data.instructions or _world_file(cfg, ctx, "gatt/instructions.jsonl")
  return instructions_lib.read_bank(path) if path else instructions_lib.default_bank()


def _dialogue_questions(cfg: Config, ctx) -> list[tuple[str, ...]]:
  """The user turns of every source dialogue; roles are checked here, before any compute."""
  source = _world_file(cfg, ctx, "gatt/dialogues.jsonl") or cfg.data.source
  if not source or source in ctx.outputs:
    raise ValueError(f"stages.{ctx.name}.data.source: give multi-turn dialogue JSONL (or a stage "
                     f"that wrote gatt/dialogues.jsonl), got {cfg.data.source!r}")
  result = []
  bad = text.BadRows(cfg.data.skip_bad_rows)
  # read_dialogues checks roles, content and control tags, failing (or skipping) by file:line.
  for where, messages in chat_data.read_dialogues(source, bad):
    users = tuple(m["content"] for m in messages if m["role"] == "user")
    if any(m["role"] == "system" for m in messages):
      raise DataError(f"{where}: a GAtt source dialogue must not have a system message (GAtt "
                      f"puts its own instruction there)")
    result.append(users)
  if not result:
    raise DataError(f"{source}: no dialogues")
  return result


def _eval_set(cfg: Config, ctx):
  path = cfg.eval.source or _world_file(cfg, ctx, "gatt/eval.jsonl")
  if not path:
    raise ValueError(f"stages.{ctx.name}.eval.source is empty and the data source wrote no "
                     f"gatt/eval.jsonl: GAtt needs an adherence evaluation set")
  return adherence.load_eval_set(path)


def check_budget(tokenizer: Tokenizer, instruction_texts, first_questions, budget: int,
                 where: str) -> None:
  """Fails before compute when a system instruction and a first turn leave no room to answer."""
  for system, question in zip(instruction_texts, first_questions):
    used = len(tokenizer.encode_dialog([{"role": "system", "content": system},
                                        {"role": "user", "content": question}]).tokens)
    if used > budget:
      raise ValueError(f"{where}: the system prompt {system[:60]!r} with its first user turn is "
                       f"{used} tokens, over the budget of {budget} (the sequence length less the "
                       f"reply's tokens); shorten it or raise the sequence length")


def training_rows(instructions, questions, replies, every_turn: bool, keep_only_adherent: bool,
                  groups=None) -> tuple[list[dict], dict]:
  """GAtt training dialogues: the instruction as the system message only, plain user turns.

  `groups[i]` names the source dialogue of conversation i when each was sampled several times;
  a (group, turn) then gives at most one example, from the first sample that qualifies.
  Returns (rows {"messages", "instruction"}, counts of sampled, kept and dropped turns).
  """
  rows, counts = [], {"sampled_turns": 0, "kept": 0, "dropped_unfinished": 0,
                      "dropped_not_adherent": 0}
  groups = range(len(replies)) if groups is None else groups
  taken = set()
  for instruction, users, reply, group in zip(instructions, questions, replies, groups):
    turns = range(len(reply)) if every_turn else [len(reply) - 1]
    counts["sampled_turns"] += len(reply)
    for t in turns:
      if (group, t) in taken:
        continue
      if not reply[t].finished or not reply[t].text:
        counts["dropped_unfinished"] += 1
        continue
      if keep_only_adherent and instruction.check(users[t], reply[t].text) is False:
        counts["dropped_not_adherent"] += 1
        continue
      messages = [{"role": "system", "content": instruction.text}]
      for u, r in zip(users[:t + 1], reply[:t + 1]):
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": r.text or "..."}]
      rows.append({"messages": messages, "instruction": instruction.to_json()})
      taken.add((group, t))
      counts["kept"] += 1
  return rows, counts



def _longest_instruction(bank, max_constraints: int) -> str:
  """The longest instruction `random_instruction` can draw from this bank."""
  longest: dict[str, str] = {}
  for constraint in bank:
    group = instructions_lib.GROUPS[constraint.family]
    phrase = max(constraint.phrase(False), constraint.phrase(True), key=len)
    if len(phrase) > len(longest.get(group, "")):
      longest[group] = phrase
  return " ".join(sorted(longest.values(), key=len, reverse=True)[:max_constraints])


def prompt_budget(cfg: Config, model_cfg: configs.ModelConfig) -> int:
  """The most prompt tokens a conversation may reach: what the sequence leaves after a reply."""
  reply_room = max(cfg.sampling.max_new_tokens, cfg.eval.max_new_tokens)
  return min(cfg.data.seq_len, 2 * model_cfg.max_seq_len) - reply_room


def _sampling_cfg(section, eos_id: int, greedy: bool = False) -> sampling.SamplingConfig:
  return sampling.SamplingConfig(
      temperature=0.0 if greedy else section.temperature,
      top_p=section.top_p if not greedy else 1.0, max_new_tokens=section.max_new_tokens,
      eos_id=eos_id)


def _flat(rates: list[float | None], prefix: str = "") -> dict:
  metrics = {f"{prefix}adherence_turn_{t + 1}": r for t, r in enumerate(rates) if r is not None}
  tested = [r for r in rates if r is not None]
  if tested:
    metrics[f"{prefix}adherence_last_turn"] = tested[-1]
  metrics[f"{prefix}adherence_by_turn"] = list(rates)
  return metrics


# Metric-name prefixes of the evaluation splits: in-distribution keeps the plain names.
SPLIT_PREFIX = {"in_distribution": "", "held_out": "held_out_"}


@dataclasses.dataclass
class Inputs:
  """Everything GAtt reads, checked before any model is loaded."""

  model_cfg: configs.ModelConfig
  init_dir: str
  tokenizer_path: str
  tokenizer: Tokenizer
  bank: list
  questions: list[tuple[str, ...]]
  eval_set: adherence.EvalSet
  prompt_budget: int
  safety: list  # [(where, messages)] replayed safety demonstrations


def validate(cfg: Config, ctx) -> Inputs:
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
  if cfg.data.examples not in ("every_turn", "last_turn"):
    raise ValueError(f"{where}.data.examples must be 'every_turn' or 'last_turn', "
                     f"got {cfg.data.examples!r}")
  model_cfg, init_dir, tokenizer_path = kit.chat_start(cfg, ctx, "a chat (SFT or RLHF) model")
  tokenizer = Tokenizer(tokenizer_path)
  bank = _bank(cfg, ctx)
  questions = _dialogue_questions(cfg, ctx)
  eval_set = _eval_set(cfg, ctx)
  longest = _longest_instruction(bank, cfg.data.max_constraints)
  budget = prompt_budget(cfg, model_cfg)
  check_budget(tokenizer, [longest] * len(questions), [q[0] for q in questions], budget,
               f"{where}.data")
  check_budget(tokenizer, [i.text for i in eval_set.instructions],
               [c.questions[0] for c in eval_set.conversations], budget, f"{where}.eval")
  return Inputs(model_cfg, init_dir, tokenizer_path, tokenizer, bank, questions, eval_set,
                budget, sft.safety_dialogues(cfg, ctx, text.BadRows(False)))


class GhostAttention:
  """GAtt's generate / encode / evaluate for the self-distillation skeleton."""

  data_file = DATA_FILE

  def __init__(self, cfg: Config, ctx, inputs: Inputs):
    self.cfg, self.ctx, self.inputs = cfg, ctx, inputs
    self.encode = kit.encode_last_turn(inputs.tokenizer)
    self.answer_evals = sft.answer_evals(sft.world_questions(cfg.data.source, ctx),
                                         inputs.tokenizer, cfg.rollout_plan)

  def generate(self, policy: Role, log) -> tuple[list[dict], dict]:
    """Steps 1-3: instructions drawn, replies sampled with them appended, examples built."""
    cfg, ctx, inputs = self.cfg, self.ctx, self.inputs
    rng = random.Random(ctx.seed)
    drawn = [instructions_lib.random_instruction(inputs.bank, rng, cfg.data.max_constraints,
                                                 cfg.data.terse_fraction)
             for _ in inputs.questions]
    copies = cfg.sampling.samples_per_dialogue
    groups = [g for g in range(len(inputs.questions)) for _ in range(copies)]
    drawn = [drawn[g] for g in groups]
    questions = [inputs.questions[g] for g in groups]
    log(f"stages.{ctx.name}: sampling {len(questions)} dialogues with the instruction on every "
        f"user turn")
    conversations = [rollout.Conversation(users, appended=i.text)
                     for i, users in zip(drawn, questions)]
    replies = rollout.converse(policy, inputs.tokenizer, conversations,
                               _sampling_cfg(cfg.sampling, inputs.tokenizer.eos_id),
                               jax.random.key(ctx.seed), batch_size=cfg.sampling.batch_size,
                               max_prompt_tokens=inputs.prompt_budget,
                               log=lambda m: log(f"  sampling {m}"))
    adherence.save_transcripts(os.path.join(ctx.directory, "samples.jsonl"), drawn,
                               conversations, replies)
    sampled_rates = adherence.adherence_by_turn(drawn, conversations, replies)
    rows, counts = training_rows(drawn, questions, replies, cfg.data.examples == "every_turn",
                                 cfg.data.keep_only_adherent, groups)
    rows += [{"messages": list(messages)} for _, messages in inputs.safety]
    counts["safety_examples"] = len(inputs.safety)
    tested = [r for r in sampled_rates if r is not None]
    counts["adherence_while_sampling"] = float(np.mean(tested)) if tested else 0.0
    counts["generated_tokens"] = sum(r.tokens for reply in replies for r in reply)
    return rows, counts

  def evaluate(self, policy: Role, when: str) -> dict:
    """Adherence by turn (greedy) on the eval set, and answer accuracy on held-out questions;
    the conversations go to DIR/adherence_<when>.jsonl."""
    metrics = measure_adherence(self.cfg, self.inputs, policy, os.path.join(
        self.ctx.directory, f"adherence_{when}.jsonl"))
    metrics.update(self.answer_evals(policy))
    return metrics


def measure_adherence(cfg: Config, inputs: Inputs, policy: Role, path: str) -> dict:
  """Adherence by turn of each split of the eval set (greedy), and how many of the earliest
  turns the longest histories had to leave out to fit the prompt budget."""
  evals = inputs.eval_set
  replies = rollout.converse(policy, inputs.tokenizer, evals.conversations,
                             _sampling_cfg(cfg.eval, inputs.tokenizer.eos_id, greedy=True),
                             jax.random.key(0), batch_size=cfg.eval.batch_size,
                             max_prompt_tokens=inputs.prompt_budget)
  adherence.save_transcripts(path, evals.instructions, evals.conversations, replies,
                             evals.splits)
  metrics = {}
  for split, prefix in SPLIT_PREFIX.items():
    keep = [i for i, s in enumerate(evals.splits) if s == split]
    if keep:
      metrics.update(_flat(adherence.adherence_by_turn(
          [evals.instructions[i] for i in keep], [evals.conversations[i] for i in keep],
          [replies[i] for i in keep]), prefix))
  metrics["history_turns_dropped_at_last_turn"] = float(np.mean([r[-1].dropped_turns
                                                                 for r in replies]))
  return metrics


def _curves(before: dict, after: dict) -> dict[str, list[float | None]]:
  curves = {}
  for split, prefix in SPLIT_PREFIX.items():
    label = "" if split == "in_distribution" else ", held-out values"
    for when, metrics in (("before", before), ("after", after)):
      if f"{prefix}adherence_by_turn" in metrics:
        curves[f"{when} GAtt{label}"] = metrics[f"{prefix}adherence_by_turn"]
  return curves


def run(cfg: Config, ctx, log=print) -> dict:
  inputs = validate(cfg, ctx)
  stage = GhostAttention(cfg, ctx, inputs)
  result, before, after = self_distill.run(cfg, ctx, stage, inputs.init_dir,
                                           inputs.tokenizer_path, log)
  if result.get("preempted"):
    return result
  curves = _curves(before, after)
  adherence.plot_adherence(curves, os.path.join(ctx.directory, "adherence.png"),
                           "GAtt: system instruction adherence by turn")
  dropped = after.get("history_turns_dropped_at_last_turn", 0.0)
  checkpoints.write_atomically(
      os.path.join(ctx.directory, "report.md"),
      "### Instruction adherence by dialogue turn\n\n" + adherence.adherence_table(curves) +
      "\n\nHeld-out values: instructions with a persona, hobby, opening or closing that GAtt's "
      "data never contains (SFT saw them, one turn at a time). Histories longer than the prompt "
      f"budget ({inputs.prompt_budget} tokens) lose their earliest turns, the system message "
      f"kept: at the last turn {dropped:.1f} turns on average.\n"
      f"\n![adherence by turn]({ctx.name}/adherence.png)\n")
  return result


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  """Adherence by turn of any model directory (`lm eval`)."""
  inputs = validate(cfg, ctx)
  policy = kit.rollout_role(roles.load("policy", model_dir, ctx.mesh(), head="lm",
                                       plan=cfg.plan),
                            cfg.rollout_plan, cfg.rollout_dtype)
  return measure_adherence(cfg, inputs, policy, os.path.join(model_dir, "adherence_eval.jsonl"))


def sampling_program(cfg: Config, model_cfg: configs.ModelConfig, mesh):
  """GAtt's largest sampling call, for `lm aot`: `sampling.batch_size` prompts at the longest
  the prompt budget allows, on the rollout plan (kit.sampling_program)."""
  # The EOS id only decides when rows stop, not any shape.
  return kit.sampling_program(
      model_cfg, mesh, cfg.rollout_plan, _sampling_cfg(cfg.sampling, sampling.SamplingConfig.eos_id),
      cfg.sampling.batch_size, prompt_budget(cfg, model_cfg))


PROGRAMS = {"train step": kit.train_step_program, "sampling": sampling_program}
