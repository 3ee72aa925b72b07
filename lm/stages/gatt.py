"""Ghost Attention (LLAMA2.md §5): teach the chat model to keep a system instruction for a whole
dialogue, by generating data with the current model and fine-tuning on it.

1. Each multi-turn dialogue of the source gets a random instruction from the bank (constraints
   from different families combined; a terse phrasing half the time).
2. The instruction is appended to every user turn and the current model samples every assistant
   turn (batched, turn by turn, its own replies in the history).
3. Training examples keep the instruction only as the system message, drop it from the user
   turns, and put the loss on the last assistant turn only (zero on every earlier token,
   assistant turns included). One example per turn of each dialogue by default [U]; replies that
   break the instruction or never reach EOS are left out by default [U] (the paper samples "like
   rejection sampling" without saying how).
4. The model is fine-tuned on them; adherence by turn is measured before and after with the
   instructions' checkers, written to metrics.json, report.md (a Table 30 shaped table) and
   adherence.png.

The generated dataset is saved as DIR/gatt_data.jsonl (reused when the stage resumes), the
sampled and evaluated conversations as DIR/samples.jsonl and DIR/adherence_{before,after}.jsonl.

Config: init_from, tokenizer, data (source: an earlier stage that wrote gatt/ data, or a path of
multi-turn dialogue JSONL; instructions: a bank JSONL, default the source's or the built-in
families; eval_source: adherence set JSONL, default the source's; seq_len; max_constraints;
terse_fraction; examples: "every_turn" | "last_turn"; keep_only_adherent; skip_bad_rows;
eval_fraction), sampling (temperature, top_p, max_new_tokens, batch_size, samples_per_dialogue), eval (max_new_tokens,
batch_size), train, optimizer, model (read by `lm aot` only, which compiles the train step and the
sampling program without a checkpoint: at run time the model is the one in init_from).
"""

from __future__ import annotations

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import chat as chat_data
from data_pipelines import instructions as instructions_lib
from data_pipelines import text
from data_pipelines.text import DataError
from lm import checkpoints, configs, hardware, model, sampling, sharding, trainer
from lm.evals import adherence
from lm.evals import chat as chat_evals
from lm.stages import common
from lm.stages.pretrain import build_trainer, make_evaluate, resolve_chat_start
# GAtt trains with the pretraining step on packed chat rows, so `lm aot` compiles it the same way.
from lm.stages.pretrain import train_step_for_aot  # noqa: F401
from lm.tokenizer import EncodedDialog, Tokenizer

DATA_FILE = "gatt_data.jsonl"
BEFORE_FILE = "adherence_before.json"


def _world_file(cfg, ctx, relative: str) -> str | None:
  if cfg.data.source in ctx.outputs:
    path = os.path.join(ctx.outputs[cfg.data.source], relative)
    return path if os.path.exists(path) else None
  return None


def _bank(cfg, ctx) -> list[instructions_lib.Constraint]:
  path = cfg.data.get("instructions") or _world_file(cfg, ctx, "gatt/instructions.jsonl")
  return instructions_lib.read_bank(path) if path else instructions_lib.default_bank()


def _dialogue_questions(cfg, ctx) -> list[tuple[str, ...]]:
  """The user turns of every source dialogue; roles are checked here, before any compute."""
  source = _world_file(cfg, ctx, "gatt/dialogues.jsonl") or cfg.data.source
  if not source or source in ctx.outputs:
    raise ValueError(f"stages.{ctx.name}.data.source: give multi-turn dialogue JSONL (or a stage "
                     f"that wrote gatt/dialogues.jsonl), got {cfg.data.source!r}")
  result = []
  bad = text.BadRows(cfg.data.get("skip_bad_rows", False))
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


def _eval_set(cfg, ctx):
  path = cfg.get("eval", {}).get("source") or _world_file(cfg, ctx, "gatt/eval.jsonl")
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


def encode_last_turn(tokenizer: Tokenizer):
  """encode_dialog with the loss on the last assistant turn only (GAtt's step 6)."""

  def encode(messages) -> EncodedDialog:
    encoded = tokenizer.encode_dialog(messages)
    last = encoded.turn == encoded.turn.max()
    return EncodedDialog(encoded.tokens, encoded.loss_mask * last, encoded.turn)

  return encode


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


def _write_jsonl(path: str, rows: list[dict]) -> None:
  checkpoints.write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))


def _sampling_cfg(section, eos_id: int, greedy: bool = False) -> sampling.SamplingConfig:
  return sampling.SamplingConfig(
      temperature=0.0 if greedy else section.get("temperature", 0.6),
      top_p=section.get("top_p", 0.9), max_new_tokens=section.max_new_tokens, eos_id=eos_id)


def generate_dataset(cfg, ctx, tokenizer, graphdef, model_cfg, params, mesh, bank, questions,
                     log=print) -> tuple[list[dict], dict]:
  """Steps 1-3: instructions drawn, replies sampled with them appended, examples built."""
  rng = random.Random(ctx.seed)
  drawn = [instructions_lib.random_instruction(bank, rng, cfg.data.max_constraints,
                                               cfg.data.terse_fraction) for _ in questions]
  # Several independent samples of each dialogue, the first that obeys kept per turn: rejection
  # sampling, which the paper likens GAtt's sampling to without giving a count [U].
  copies = cfg.sampling.get("samples_per_dialogue", 1)
  groups = [g for g in range(len(questions)) for _ in range(copies)]
  drawn = [drawn[g] for g in groups]
  questions = [questions[g] for g in groups]
  conversations = [adherence.Conversation(users, appended=i.text)
                   for i, users in zip(drawn, questions)]
  replies = adherence.converse(graphdef, model_cfg, params, tokenizer, conversations,
                               _sampling_cfg(cfg.sampling, tokenizer.eos_id),
                               jax.random.key(ctx.seed),
                               mesh, cfg.sampling.batch_size, log=lambda m: log(f"  sampling {m}"))
  adherence.save_transcripts(os.path.join(ctx.directory, "samples.jsonl"), drawn, conversations,
                             replies)
  sampled_rates = adherence.adherence_by_turn(drawn, conversations, replies)
  rows, counts = training_rows(drawn, questions, replies, cfg.data.examples == "every_turn",
                               cfg.data.keep_only_adherent, groups)
  tested = [r for r in sampled_rates if r is not None]
  counts["adherence_while_sampling"] = float(np.mean(tested)) if tested else 0.0
  return rows, counts


def measure_adherence(cfg, tokenizer, graphdef, model_cfg, params, mesh, eval_set, path: str
                      ) -> list[float | None]:
  instructions, conversations = eval_set
  replies = adherence.converse(graphdef, model_cfg, params, tokenizer, conversations,
                               _sampling_cfg(cfg.eval, tokenizer.eos_id, greedy=True),
                               jax.random.key(0),
                               mesh, cfg.eval.batch_size)
  adherence.save_transcripts(path, instructions, conversations, replies)
  return adherence.adherence_by_turn(instructions, conversations, replies)


def _flat(rates: list[float | None], suffix: str) -> dict:
  metrics = {f"adherence_turn_{t + 1}{suffix}": r for t, r in enumerate(rates) if r is not None}
  tested = [r for r in rates if r is not None]
  if tested:
    metrics[f"adherence_last_turn{suffix}"] = tested[-1]
  return metrics


def _longest_instruction(bank, max_constraints: int) -> str:
  """The longest instruction `random_instruction` can draw from this bank."""
  longest: dict[str, str] = {}
  for constraint in bank:
    group = instructions_lib.GROUPS[constraint.family]
    phrase = max(constraint.phrase(False), constraint.phrase(True), key=len)
    if len(phrase) > len(longest.get(group, "")):
      longest[group] = phrase
  return " ".join(sorted(longest.values(), key=len, reverse=True)[:max_constraints])


def prompt_budget(cfg, model_cfg: configs.ModelConfig) -> int:
  """The most prompt tokens a conversation may reach: what the sequence leaves after a reply."""
  reply_room = max(cfg.sampling.max_new_tokens, cfg.eval.max_new_tokens)
  return min(cfg.data.seq_len, 2 * model_cfg.max_seq_len) - reply_room


def _validate(cfg, ctx):
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
  if cfg.data.examples not in ("every_turn", "last_turn"):
    raise ValueError(f"{where}.data.examples must be 'every_turn' or 'last_turn', "
                     f"got {cfg.data.examples!r}")
  model_cfg, init_dir, tokenizer_path = resolve_chat_start(cfg, ctx,
                                                          "a chat (SFT or RLHF) model")
  tokenizer = Tokenizer(tokenizer_path)
  bank = _bank(cfg, ctx)
  questions = _dialogue_questions(cfg, ctx)
  eval_set = _eval_set(cfg, ctx)
  longest = _longest_instruction(bank, cfg.data.max_constraints)
  budget = prompt_budget(cfg, model_cfg)
  check_budget(tokenizer, [longest] * len(questions),
               [q[0] for q in questions], budget, f"{where}.data")
  check_budget(tokenizer, [i.text for i in eval_set[0]], [c.questions[0] for c in eval_set[1]],
               budget, f"{where}.eval")
  return model_cfg, init_dir, tokenizer_path, tokenizer, bank, questions, eval_set


def run(cfg, ctx, log=print) -> dict:
  where = f"stages.{ctx.name}"
  model_cfg, init_dir, tokenizer_path, tokenizer, bank, questions, eval_set = _validate(cfg, ctx)
  mesh = ctx.mesh()
  _, _, graphdef, initial = checkpoints.load_model(init_dir, mesh)
  tr, graphdef = build_trainer(cfg, model_cfg, mesh, where)
  checkpoints.write_model_info(ctx.directory, model_cfg, "lm", tokenizer_path)

  data_path = os.path.join(ctx.directory, DATA_FILE)
  counts_path = os.path.join(ctx.directory, "gatt_data_counts.json")
  if os.path.exists(data_path) and os.path.exists(counts_path):
    log(f"{where}: reusing the generated dataset {data_path}")
    rows = [json.loads(line) for line in open(data_path)]
    counts = json.load(open(counts_path))
  else:
    log(f"{where}: sampling {len(questions)} dialogues with the instruction on every user turn")
    rows, counts = generate_dataset(cfg, ctx, tokenizer, graphdef, model_cfg, initial, mesh, bank,
                                    questions, log)
    _write_jsonl(data_path, rows)
    checkpoints.write_atomically(counts_path, json.dumps(counts, indent=2) + "\n")
  if not rows:
    raise ValueError(f"{where}: no GAtt example survived sampling ({counts}); the starting model "
                     f"does not follow instructions in a user turn, so there is nothing to distil")

  before_path = os.path.join(ctx.directory, BEFORE_FILE)
  if os.path.exists(before_path):
    before = json.load(open(before_path))
  else:
    before = measure_adherence(cfg, tokenizer, graphdef, model_cfg, initial, mesh, eval_set,
                               os.path.join(ctx.directory, "adherence_before.jsonl"))
    checkpoints.write_atomically(before_path, json.dumps(before) + "\n")
  log(f"{where}: adherence by turn before GAtt: {before}")

  report = chat_data.PackReport()
  held_out = max(1, int(len(rows) * cfg.data.eval_fraction))
  order = np.random.default_rng(ctx.seed).permutation(len(rows))
  split = {"eval": [rows[i] for i in order[:held_out]], "train": [rows[i] for i in order[held_out:]]}
  encode = encode_last_turn(tokenizer)

  # Generated examples, not a user's rows: one longer than a row is dropped and counted.
  bad = text.BadRows(skip=True)

  def packed(name, pack_report):
    examples = chat_data.encode_examples(
        [(f"{data_path}:{name}:{i}", r["messages"]) for i, r in enumerate(split[name])], encode,
        cfg.data.seq_len, bad)
    return chat_data.pack_examples(examples, cfg.data.seq_len, pack_report)

  train_rows = packed("train", report)
  eval_rows = packed("eval", chat_data.PackReport())
  data = text.PackedBatches(train_rows, text.PackingConfig(
      cfg.data.seq_len, tr.cfg.batch_size, ctx.seed, tr.process_rows(tr.cfg.batch_size)))
  batches = text.fixed_batches(eval_rows, tr.cfg.batch_size, cfg.data.eval_batches,
                               tr.process_rows(tr.cfg.batch_size))
  after_rates: list = []

  def extra(params):
    rates = measure_adherence(cfg, tokenizer, graphdef, model_cfg, params, mesh, eval_set,
                              os.path.join(ctx.directory, "adherence_after.jsonl"))
    after_rates[:] = rates
    metrics = _flat(rates, "")
    questions_path = _world_file(cfg, ctx, "sft/questions.jsonl")
    if questions_path:
      metrics.update(chat_evals.answer_metrics(graphdef, model_cfg, params, tokenizer,
                                               chat_evals.load_questions(questions_path), mesh))
    return metrics

  result = trainer.run(
      tr, params=initial, data=data, workdir=ctx.directory,
      evaluate=make_evaluate(graphdef, mesh, [tr.put_batch(b) for b in batches], extra),
      tokens_per_step=tr.cfg.batch_size * cfg.data.seq_len,
      flops_per_token=hardware.flops_per_token(configs.param_count(model_cfg),
                                               model_cfg.n_layers, cfg.data.seq_len,
                                               model_cfg.dim), log=log)
  if result.get("preempted"):
    return result
  result.update(_flat(before, "_before"))
  result.update({f"data_{k}": v for k, v in counts.items()}, train_examples=report.examples,
                packed_rows=report.rows,
                **{f"dropped_{k.replace(' ', '_')}": v for k, v in bad.dropped.items()})
  curves = {"before GAtt": before, "after GAtt": after_rates}
  adherence.plot_adherence(curves, os.path.join(ctx.directory, "adherence.png"),
                           "GAtt: system instruction adherence by turn")
  checkpoints.write_atomically(
      os.path.join(ctx.directory, "report.md"),
      "### Instruction adherence by dialogue turn\n\n" + adherence.adherence_table(curves) +
      f"\n\n![adherence by turn]({ctx.name}/adherence.png)\n")
  return result


def evaluate(cfg, ctx, model_dir: str) -> dict:
  """Adherence by turn (and answer accuracy on the world's held-out questions) of any model."""
  _, _, _, tokenizer, _, _, eval_set = _validate(cfg, ctx)
  mesh = ctx.mesh()
  model_cfg, _, graphdef, params = checkpoints.load_model(model_dir, mesh)
  rates = measure_adherence(cfg, tokenizer, graphdef, model_cfg, params, mesh, eval_set,
                            os.path.join(model_dir, "adherence_eval.jsonl"))
  return _flat(rates, "")


def sampling_for_aot(cfg, mesh):
  """(jitted generate, abstract args, rules, model FLOPs per call) of the largest sampling call.

  That is `sampling.batch_size` prompts at the longest padded length the prompt budget allows,
  plus `max_new_tokens`: one prefill and the decode loop over a cache of that many slots. The
  params take their training shardings (as restored for sampling at run time), the prompts the
  batch sharding, and nothing is allocated.
  """
  if "model" not in cfg:
    raise ValueError("the stage has no `model` section, so there is no model to compile")
  model_cfg = common.model_config(cfg.model, "model")
  rules = sharding.DEFAULT_RULES
  graphdef, _ = model.abstract_model(model_cfg)
  params = model.abstract_params(model_cfg, mesh, rules)
  # The EOS id only decides when rows stop, not any shape.
  sampling_cfg = _sampling_cfg(cfg.sampling, sampling.SamplingConfig.eos_id)
  prompt_len = adherence.padded_length(prompt_budget(cfg, model_cfg))
  shape = (cfg.sampling.batch_size, prompt_len)
  prompts = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.data_sharding(mesh, 2, rules))
  key = jax.eval_shape(jax.random.key, 0)
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  args = (graphdef, model_cfg, sampling_cfg, params, prompts, prompts, rng)
  # Forward only: a third of the training FLOPs per token, over prompt and new tokens.
  length = prompt_len + sampling_cfg.max_new_tokens
  flops = hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers, length,
                                   model_cfg.dim) / 3 * shape[0] * length
  return sampling.generate_program, args, rules, flops
