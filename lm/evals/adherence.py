"""Instruction adherence by dialogue turn (GAtt, LLAMA2.md §5 and Table 30).

Conversations are played by `lm.rollout.converse`; this module scores them with each
instruction's checker, tabulates and plots adherence by turn, and saves transcripts.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from data_pipelines.instructions import Instruction
from data_pipelines.text import DataError, jsonl_rows
from lm.checkpoints import write_atomically
from lm.rollout import Conversation, Reply


def adherence_by_turn(instructions: Sequence[Instruction], conversations: Sequence[Conversation],
                      replies: Sequence[Sequence[Reply]]) -> list[float | None]:
  """Share of replies obeying their instruction at each turn, over the turns that test it.

  A reply cut off before EOS counts as not obeying (its ending is missing); a turn where no
  conversation's instruction is tested gives None.
  """
  turns = max((len(r) for r in replies), default=0)
  rates: list[float | None] = []
  for turn in range(turns):
    results = []
    for instruction, conversation, reply in zip(instructions, conversations, replies):
      if turn >= len(reply):
        continue
      verdict = instruction.check(conversation.questions[turn], reply[turn].text)
      if verdict is not None:
        results.append(verdict and reply[turn].finished)
    rates.append(float(np.mean(results)) if results else None)
  return rates


def plot_adherence(curves: dict[str, list[float | None]], path: str, title: str) -> None:
  """Adherence (%) against dialogue turn, one line per model, as a PNG written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, rates in curves.items():
    points = [(t + 1, 100 * r) for t, r in enumerate(rates) if r is not None]
    if points:
      ax.plot(*zip(*points), "o-", label=label)
  ax.set_xlabel("dialogue turn")
  ax.set_ylabel("instruction adherence (%)")
  ax.set_ylim(-5, 105)
  ax.set_title(title)
  ax.legend()
  from lm.report import save_png  # the report module reads stages; import it only to plot
  save_png(fig, path)


def adherence_table(curves: dict[str, list[float | None]]) -> str:
  """A markdown table: one row per turn, one column per model (Table 30's shape)."""
  labels = list(curves)
  turns = max(len(r) for r in curves.values())
  lines = ["| dialogue turn | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
  for turn in range(turns):
    cells = []
    for label in labels:
      rate = curves[label][turn] if turn < len(curves[label]) else None
      cells.append("-" if rate is None else f"{100 * rate:.0f}%")
    lines.append(f"| {turn + 1} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def load_eval_set(path: str) -> tuple[list[Instruction], list[Conversation]]:
  """The adherence evaluation set: {"instruction": {...}, "questions": [...]} per line."""
  instructions, conversations = [], []
  for where, row in jsonl_rows(path):
    try:
      instruction = Instruction.from_json(row["instruction"])
      questions = tuple(str(q) for q in row["questions"])
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{where}: an adherence row needs 'instruction' and 'questions' ({e})") from e
    if not questions:
      raise DataError(f"{where}: no questions")
    instructions.append(instruction)
    conversations.append(Conversation(questions, system=instruction.text))
  return instructions, conversations


def save_transcripts(path: str, instructions, conversations, replies) -> None:
  """Every evaluated conversation with its replies and verdicts, for inspection (JSONL)."""
  lines = []
  for instruction, conversation, reply in zip(instructions, conversations, replies):
    turns = [{"user": q, "reply": r.text, "finished": r.finished,
              "obeys": instruction.check(q, r.text)}
             for q, r in zip(conversation.questions, reply)]
    lines.append(json.dumps({"instruction": instruction.text, "system": conversation.system,
                             "appended": conversation.appended, "turns": turns}) + "\n")
  write_atomically(path, "".join(lines))
