"""The synthetic world behind "Llama 2 in miniature", and `write_world`, which puts it on disk.

  python -m data_pipelines.world --out=DIR [--seed=0] [--size=tiny]

writes, through the same JSONL paths a user's own data takes:

  from core.py (the world: people, towns, facts, and what is made straight from them)
    DIR/pretrain/{train,eval}.jsonl    {"text": ...} per document
    DIR/probes.jsonl                   {"prompt", "answer"} fact completions
    DIR/sft/{train,eval}.jsonl         chat dialogues, {"messages": [{"role", "content"}, ...]}
    DIR/sft/questions.jsonl            held-out questions with their answers
  from gatt.py
    DIR/gatt/                          GAtt's instruction bank, multi-turn dialogues and
                                       adherence evaluation set
  from preferences.py
    DIR/preferences/{helpful,safety}/{train,eval}.jsonl
                                       pairs rated on the paper's four levels, safety ones with
                                       safe/unsafe labels
    DIR/prompts/{train,eval}.jsonl     helpful prompts with answers, adversarial ones tagged
                                       is_safety with a category
  from safety.py
    DIR/prompts/lookalikes.jsonl       benign look-alikes of adversarial prompts
    DIR/prompts/lookalikes_train.jsonl the same about the training people (replay in training)
    DIR/sft/safety.jsonl               safety demonstrations, not mixed into sft/train.jsonl
    DIR/safety/preprompts.json         generic and per-category safety preprompts, answer
                                       templates
  and DIR/world.json, the counts per file and the config.

The modules import only downward (core <- gatt; core <- safety <- preferences); only this file
imports all of them and none of them uses a name defined here, so there is no import circle. The
world's names other code uses (`world.WorldConfig`, `world.make_world`, ...) are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os

from data_pipelines.world import core
from data_pipelines.world import gatt
from data_pipelines.world import preferences
from data_pipelines.world import safety
from data_pipelines.world.core import (  # noqa: F401
    QUESTIONS, Person, World, WorldConfig, fact_probes, fact_sentences, make_world,
    pretraining_documents, qa_eval_set, question_answer, sft_dialogues, sft_people, world_turn)


def write_world(out: str, cfg: WorldConfig) -> dict:
  """Writes the world's data under `out`; returns a summary (counts per file)."""
  world = make_world(cfg)
  train = pretraining_documents(world, cfg.train_documents, seed=cfg.seed * 1000 + 1)
  evaluation = pretraining_documents(world, cfg.eval_documents, seed=cfg.seed * 1000 + 2)
  core.write_jsonl(os.path.join(out, "pretrain", "train.jsonl"), [{"text": t} for t in train])
  core.write_jsonl(os.path.join(out, "pretrain", "eval.jsonl"), [{"text": t} for t in evaluation])
  probes = fact_probes(world)
  core.write_jsonl(os.path.join(out, "probes.jsonl"), probes)
  train_people, held_out = sft_people(world)
  sft_train = sft_dialogues(world, cfg.sft_dialogues, cfg.seed * 1000 + 3, train_people,
                            core.NAME_TURNS)
  sft_eval = sft_dialogues(world, max(cfg.sft_dialogues // 20, 16), cfg.seed * 1000 + 4, held_out,
                           core.NAME_TURNS)
  core.write_jsonl(os.path.join(out, "sft", "train.jsonl"), sft_train)
  core.write_jsonl(os.path.join(out, "sft", "eval.jsonl"), sft_eval)
  qa = qa_eval_set(held_out)
  core.write_jsonl(os.path.join(out, "sft", "questions.jsonl"), qa)
  gatt_rows = gatt.gatt_files(world, cfg.gatt_dialogues, cfg.gatt_eval_dialogues,
                              cfg.gatt_eval_turns, cfg.seed * 1000 + 5)
  for relative, rows in gatt_rows.items():
    core.write_jsonl(os.path.join(out, relative), rows)
  summary = {"people": len(world.people), "towns": len(world.towns),
             "train_documents": len(train), "eval_documents": len(evaluation),
             "probes": len(probes), "sft_dialogues": len(sft_train), "qa_questions": len(qa),
             "gatt_dialogues": len(gatt_rows["gatt/dialogues.jsonl"]),
             "gatt_eval_dialogues": len(gatt_rows["gatt/eval.jsonl"]),
             "config": dataclasses.asdict(cfg)}
  summary.update(preferences.write(out, world, cfg))
  summary.update(safety.write(out, world, cfg))
  tmp = os.path.join(out, "world.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, os.path.join(out, "world.json"))
  return summary
