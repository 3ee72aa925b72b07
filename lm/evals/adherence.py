"""Multi-turn conversations with a model, batched, and instruction adherence by turn (GAtt).

`converse` plays many conversations at once, turn by turn: at turn t every conversation's history
(its own earlier replies included) is encoded in the Llama 2 chat format and all prompts are
sampled in fixed-shape batches (prompt lengths rounded up to a bucket, batches padded to full
size) so a whole evaluation compiles a handful of programs. GAtt uses it twice: to sample its
training data (the instruction appended to every user turn) and to measure adherence (the
instruction only in the system message), LLAMA2.md §5 and Table 30.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Sequence

import jax
import numpy as np

from data_pipelines.instructions import Instruction
from data_pipelines.text import DataError, jsonl_rows
from lm import sampling
from lm.checkpoints import write_atomically
from lm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Conversation:
  """User turns to play, with an optional system message and text appended to every user turn."""

  questions: tuple[str, ...]
  system: str | None = None
  appended: str | None = None

  def user_text(self, turn: int) -> str:
    question = self.questions[turn]
    return f"{question} {self.appended}" if self.appended else question

  def messages(self, turn: int, replies: Sequence[str]) -> list[dict]:
    """The dialog up to user turn `turn` (0-based), with `replies` as the earlier answers."""
    messages = [{"role": "system", "content": self.system}] if self.system else []
    for t in range(turn):
      messages += [{"role": "user", "content": self.user_text(t)},
                   {"role": "assistant", "content": replies[t] or "..."}]
    return messages + [{"role": "user", "content": self.user_text(turn)}]


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  finished: bool  # ended with EOS within the token budget


# Prompt lengths are padded up to a multiple of this, bounding recompiles.
LENGTH_BUCKET = 64


def padded_length(n: int, multiple: int = LENGTH_BUCKET) -> int:
  """The prompt length `converse` compiles for when its longest prompt has n tokens."""
  return -(-n // multiple) * multiple


def converse(graphdef, model_cfg, params, tokenizer: Tokenizer,
             conversations: Sequence[Conversation], cfg: sampling.SamplingConfig, rng: jax.Array,
             mesh=None, batch_size: int = 64, length_bucket: int = LENGTH_BUCKET,
             log=lambda text: None) -> list[list[Reply]]:
  """Plays every conversation to its last turn; returns replies[conversation][turn].

  Args:
    conversations: N conversations of any number of turns.
    cfg: sampling settings (temperature 0 for greedy); `eos_id` must be the tokenizer's.
    batch_size: prompts per generate call; the last batch of a turn is padded to this size.
    length_bucket: prompt lengths are padded up to a multiple of this, bounding recompiles.
  """
  replies: list[list[Reply]] = [[] for _ in conversations]
  context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  turns = max((len(c.questions) for c in conversations), default=0)
  for turn in range(turns):
    active = [i for i, c in enumerate(conversations) if turn < len(c.questions)]
    prompts = [tokenizer.encode_dialog(conversations[i].messages(
        turn, [r.text for r in replies[i]])).tokens.tolist() for i in active]
    # Batches of similar lengths: less left padding to prefill and attend over.
    order = sorted(range(len(active)), key=lambda k: len(prompts[k]))
    active, prompts = [active[k] for k in order], [prompts[k] for k in order]
    for start in range(0, len(active), batch_size):
      chunk = prompts[start:start + batch_size]
      padded = chunk + [chunk[0]] * (batch_size - len(chunk))
      length = padded_length(max(len(p) for p in chunk), length_bucket)
      tokens, segment_ids = sampling.left_pad(padded, length=length)
      with context:
        out = sampling.generate(graphdef, model_cfg, params, tokens, segment_ids,
                                jax.random.fold_in(rng, turn * 100_003 + start), cfg)
      out_tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      for offset, index in enumerate(active[start:start + batch_size]):
        produced = out_tokens[offset, :lengths[offset]].tolist()
        finished = bool(produced) and produced[-1] == tokenizer.eos_id
        text = tokenizer.decode([t for t in produced if t != tokenizer.eos_id]).strip()
        replies[index].append(Reply(text, finished))
    log(f"turn {turn + 1}/{turns}: {len(active)} replies")
  return replies


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
