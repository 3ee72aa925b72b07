"""Instruction adherence by dialogue turn (GAtt, LLAMA2.md §5 and Table 30).

Conversations are played by `lm.rollout.converse`; this module scores them with each
instruction's checker, tabulates and plots adherence by turn, and saves transcripts.
"""

from __future__ import annotations

import dataclasses
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


SPLITS = ("in_distribution", "held_out")


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Conversations under system instructions; `splits[i]` says whether conversation i's
  instruction draws on values the stage trains on ("in_distribution") or not ("held_out")."""

  instructions: list[Instruction]
  conversations: list[Conversation]
  splits: list[str]

  def split(self, name: str) -> EvalSet:
    keep = [i for i, s in enumerate(self.splits) if s == name]
    return EvalSet([self.instructions[i] for i in keep], [self.conversations[i] for i in keep],
                   [name] * len(keep))

  def __len__(self) -> int:
    return len(self.conversations)


def load_eval_set(path: str) -> EvalSet:
  """The adherence evaluation set: {"instruction": {...}, "questions": [...]} per line, with an
  optional "split" ("in_distribution", the default, or "held_out")."""
  instructions, conversations, splits = [], [], []
  for where, row in jsonl_rows(path):
    try:
      instruction = Instruction.from_json(row["instruction"])
      questions = tuple(str(q) for q in row["questions"])
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{where}: an adherence row needs 'instruction' and 'questions' ({e})") from e
    if not questions:
      raise DataError(f"{where}: no questions")
    split = row.get("split", SPLITS[0])
    if split not in SPLITS:
      raise DataError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    instructions.append(instruction)
    conversations.append(Conversation(questions, system=instruction.text))
    splits.append(split)
  return EvalSet(instructions, conversations, splits)


def save_transcripts(path: str, instructions, conversations, replies, splits=None) -> None:
  """Every evaluated conversation with its replies and verdicts, for inspection (JSONL)."""
  lines = []
  splits = splits or [None] * len(conversations)
  for instruction, conversation, reply, split in zip(instructions, conversations, replies, splits):
    turns = [{"user": q, "reply": r.text, "finished": r.finished,
              "obeys": instruction.check(q, r.text), "dropped_turns": r.dropped_turns}
             for q, r in zip(conversation.questions, reply)]
    row = {"instruction": instruction.text, "system": conversation.system,
           "appended": conversation.appended, "turns": turns}
    if split:
      row["split"] = split
    lines.append(json.dumps(row) + "\n")
  write_atomically(path, "".join(lines))
