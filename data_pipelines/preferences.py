"""Preference pairs and prompts: read, validate, encode, and pack pairs for a reward model.

Preference pairs (LLAMA2.md §6.1) are JSONL, one pair a line, in either of two forms:

  {"messages": [{"role", "content"}, ..., {"role": "user", ...}],  # the dialogue so far
   "chosen": "...", "rejected": "...",                             # the two final answers
   "rating": "significantly better" | "better" | "slightly better" | "negligibly better or unsure",
   "chosen_safe": true, "rejected_safe": false,                    # optional safety labels
   "is_safety": false}                                             # optional track tag
  ("prompt": "text" may stand for a one-turn "messages"; "rating" may be absent: unrated)

  {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}  # Anthropic HH-RLHF

HH-RLHF rows hold two whole transcripts that share every turn but the last answer; the shared
turns become the prompt. Pairs whose chosen answer is unsafe and rejected one safe are refused:
the paper excludes them.

Prompts (rejection sampling, PPO, context distillation) are JSONL too:
  {"prompt": "..." or "messages": [... ending with a user turn], "is_safety": bool,
   "category": "...", "answer": "..."}  (all but the prompt optional)

Every fault names file:line and reason, or with a skipping `text.BadRows` is dropped and counted.

Reward-model rows: each pair becomes two segments of one packed row, the chosen dialogue then the
rejected one, so attention never crosses them and the reward is read at each one's last token.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from data_pipelines.chat import EncodeDialog, fits, valid_messages
from data_pipelines.text import BadRows, document_files, jsonl_rows

# The paper's four levels, most separable first (index = the rating id stored in rows).
RATINGS = ("significantly better", "better", "slightly better", "negligibly better or unsure")
UNRATED = -1
_RATING_NAMES = {**{name: i for i, name in enumerate(RATINGS)},
                 "negligibly better / unsure": 3, "negligibly better": 3, "unsure": 3}


@dataclasses.dataclass(frozen=True)
class Pair:
  """One comparison: the dialogue so far (ends with a user turn) and two answers to it.

  rating: index into RATINGS, or UNRATED. chosen_safe / rejected_safe: None when unlabelled.
  """

  where: str
  messages: tuple
  chosen: str
  rejected: str
  rating: int = UNRATED
  chosen_safe: bool | None = None
  rejected_safe: bool | None = None
  is_safety: bool = False


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A prompt to sample from: messages end with a user turn; answer is the ground truth if any."""

  where: str
  messages: tuple
  is_safety: bool = False
  category: str = ""
  answer: str = ""


class _Skip(Exception):
  """A row already reported to BadRows."""


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(transcript: str) -> list[dict]:
  """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages.

  Raises:
    ValueError: text before the first turn, or a transcript with no turns.
  """
  parts = _HH_TURN.split(transcript)
  if parts[0].strip() or len(parts) < 3:
    raise ValueError("not an HH-RLHF transcript (turns start with '\\n\\nHuman:' / "
                     "'\\n\\nAssistant:')")
  roles = {"Human": "user", "Assistant": "assistant"}
  return [{"role": roles[speaker], "content": content.strip()}
          for speaker, content in zip(parts[1::2], parts[2::2])]


def _messages(where: str, row: dict, bad: BadRows):
  """The prompt of a row: "messages", or "prompt" as one user turn; None if neither is valid."""
  if isinstance(row.get("prompt"), str) and "messages" not in row:
    messages = [{"role": "user", "content": row["prompt"]}]
  elif "messages" in row:
    messages = row["messages"]
  else:
    bad(where, "missing field", "needs 'messages' (or 'prompt')")
    return None
  return messages if valid_messages(where, messages, bad, "user") else None


def _flag(where: str, row: dict, key: str, bad: BadRows, default=None):
  value = row.get(key, default)
  if value is not None and not isinstance(value, bool):
    bad(where, "bad label", f"'{key}' must be true or false, got {value!r:.40}")
    raise _Skip
  return value


def _hh_pair(where: str, row: dict, bad: BadRows):
  try:
    chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
  except ValueError as e:
    bad(where, "malformed HH transcript", str(e))
    raise _Skip from e
  if chosen[:-1] != rejected[:-1] or {chosen[-1]["role"], rejected[-1]["role"]} != {"assistant"}:
    bad(where, "chosen and rejected disagree",
        "the two transcripts must share every turn but the final assistant answer")
    raise _Skip
  return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def pair_from_row(where: str, row, bad: BadRows) -> Pair | None:
  """Validates one parsed JSONL row as a preference pair; None if it went to `bad`."""
  if not isinstance(row, dict):
    bad(where, "missing field", "a pair is a JSON object with 'chosen' and 'rejected'")
    return None
  try:
    for key in ("chosen", "rejected"):
      if not isinstance(row.get(key), str):
        bad(where, "missing field", f"needs a string field '{key}'")
        raise _Skip
    if "messages" not in row and "prompt" not in row:
      messages, chosen, rejected = _hh_pair(where, row, bad)
      if not valid_messages(where, messages, bad, "user"):
        raise _Skip
    else:
      messages, chosen, rejected = _messages(where, row, bad), row["chosen"], row["rejected"]
      if messages is None:
        raise _Skip
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
      if not answer.strip():
        bad(where, "empty text", f"empty '{key}' answer")
        raise _Skip
      if not valid_messages(where, list(messages) + [{"role": "assistant", "content": answer}],
                            bad, "assistant"):
        raise _Skip
    if chosen.strip() == rejected.strip():
      bad(where, "chosen and rejected disagree", "chosen and rejected are the same answer")
      raise _Skip
    rating = row.get("rating")
    if rating is not None and rating not in _RATING_NAMES:
      bad(where, "bad label", f"rating {rating!r:.40} is not one of {RATINGS}")
      raise _Skip
    chosen_safe, rejected_safe = (_flag(where, row, "chosen_safe", bad),
                                  _flag(where, row, "rejected_safe", bad))
    if chosen_safe is False and rejected_safe is True:
      bad(where, "unsafe chosen over safe",
          "chosen is unsafe and rejected is safe: such pairs are excluded (LLAMA2.md §6.1)")
      raise _Skip
    is_safety = _flag(where, row, "is_safety", bad, False)
  except _Skip:
    return None
  return Pair(where, tuple(messages), chosen, rejected,
              UNRATED if rating is None else _RATING_NAMES[rating], chosen_safe, rejected_safe,
              is_safety)


def prompt_from_row(where: str, row, bad: BadRows) -> Prompt | None:
  """Validates one parsed JSONL row as a prompt; None if it went to `bad`."""
  if not isinstance(row, dict):
    bad(where, "missing field", "a prompt is a JSON object with 'prompt' or 'messages'")
    return None
  messages = _messages(where, row, bad)
  if messages is None:
    return None
  try:
    is_safety = _flag(where, row, "is_safety", bad, False)
  except _Skip:
    return None
  for key in ("category", "answer"):
    if not isinstance(row.get(key, ""), str):
      bad(where, "bad label", f"'{key}' must be a string")
      return None
  return Prompt(where, tuple(messages), is_safety, row.get("category", ""), row.get("answer", ""))


def read_pairs(source: str, bad: BadRows | None = None) -> list[Pair]:
  """Every valid preference pair in the JSONL files of `source` (a file, directory or glob)."""
  bad = bad if bad is not None else BadRows()
  pairs = (pair_from_row(where, row, bad) for path in document_files(source)
           for where, row in jsonl_rows(path, bad=bad))
  return [p for p in pairs if p is not None]


def read_prompts(source: str, bad: BadRows | None = None) -> list[Prompt]:
  """Every valid prompt in the JSONL files of `source`."""
  bad = bad if bad is not None else BadRows()
  prompts = (prompt_from_row(where, row, bad) for path in document_files(source)
             for where, row in jsonl_rows(path, bad=bad))
  return [p for p in prompts if p is not None]


def mix_by_safety(prompts: Sequence[Prompt], safety_share: float, count: int = 0) -> list[Prompt]:
  """The first prompts of each kind, `safety_share` of them `is_safety` (LLAMA2.md §8.3: the
  adversarial share of the RLHF prompts), `count` in all (0: as many as the pools allow); the
  source's order is kept. A pool too small for its share gives all it has.

  Raises:
    ValueError: a share in (0, 1] asks for safety prompts and there are none, or a share in
      [0, 1) asks for helpful prompts and there are none.
  """
  safety = [i for i, p in enumerate(prompts) if p.is_safety]
  helpful = [i for i, p in enumerate(prompts) if not p.is_safety]
  if (safety_share > 0 and not safety) or (safety_share < 1 and not helpful):
    raise ValueError(f"safety_share={safety_share} needs both kinds of prompts; there are "
                     f"{len(safety)} safety and {len(helpful)} helpful ones")
  if count <= 0:  # the largest set with this share the pools allow
    limits = ([len(safety) / safety_share] if safety_share > 0 else []) + (
        [len(helpful) / (1 - safety_share)] if safety_share < 1 else [])
    count = int(min(limits))
  n_safety = min(round(safety_share * count), len(safety))
  n_helpful = min(count - round(safety_share * count), len(helpful))
  keep = sorted(safety[:n_safety] + helpful[:n_helpful])
  return [prompts[i] for i in keep]


@dataclasses.dataclass(frozen=True)
class EncodedPair:
  chosen: np.ndarray  # [Lc] int32: the whole dialogue ending with the chosen answer and EOS
  rejected: np.ndarray  # [Lr] int32
  pair: Pair


def encode_pairs(pairs: Sequence[Pair], encode_dialog: EncodeDialog, seq_len: int,
                 bad: BadRows | None = None) -> list[EncodedPair]:
  """Both dialogues of every pair in the chat format; a pair too long for one row goes to `bad`."""
  bad = bad if bad is not None else BadRows()
  encoded = []
  for pair in pairs:
    dialogs = [np.asarray(encode_dialog(list(pair.messages) +
                                        [{"role": "assistant", "content": answer}]).tokens,
                          np.int32) for answer in (pair.chosen, pair.rejected)]
    # A row holds both segments whole (no one-token shift: a reward model reads, not predicts).
    if fits(pair.where, len(dialogs[0]) + len(dialogs[1]), seq_len, bad):
      encoded.append(EncodedPair(dialogs[0], dialogs[1], pair))
  return encoded


def pack_pairs(encoded: Sequence[EncodedPair], seq_len: int,
               pairs_per_row: int | None = None) -> dict[str, np.ndarray]:
  """Packs pairs whole, in order, into rows for a reward model.

  Returns a dict of arrays (N rows, T = seq_len positions, P = pairs_per_row, by default the most
  any row holds):
    tokens, segment_ids, positions: [N, T] int32. The k-th pair of a row is segments 2k+1
      (chosen) and 2k+2 (rejected); 0 is padding. Positions restart at 0 in every segment.
    chosen_index, rejected_index: [N, P] int32, the position in the row of each answer's last
      token (its EOS), where the scalar reward is read.
    pair_mask: [N, P] float32, 1 for a real pair. rating: [N, P] int32 (RATINGS index, -1
      unrated or padding). is_safety: [N, P] int32. chosen_safe, rejected_safe: [N, P] int32
      (1 safe, 0 unsafe, -1 unlabelled).
  """
  rows: list[list[EncodedPair]] = [[]]
  used = 0
  for pair in encoded:
    need = len(pair.chosen) + len(pair.rejected)
    if need > seq_len:
      raise ValueError(f"{pair.pair.where}: {need} tokens do not fit a row of {seq_len}")
    if used + need > seq_len:
      rows.append([])
      used = 0
    rows[-1].append(pair)
    used += need
  most = max(len(r) for r in rows)
  width = pairs_per_row or most
  if width < most:
    raise ValueError(f"a row holds {most} pairs, more than pairs_per_row={width}")
  out = {k: np.zeros((len(rows), seq_len), np.int32)
         for k in ("tokens", "segment_ids", "positions")}
  for key in ("chosen_index", "rejected_index", "is_safety"):
    out[key] = np.zeros((len(rows), width), np.int32)
  for key in ("rating", "chosen_safe", "rejected_safe"):
    out[key] = np.full((len(rows), width), -1, np.int32)
  out["pair_mask"] = np.zeros((len(rows), width), np.float32)
  label = lambda safe: -1 if safe is None else int(safe)  # noqa: E731
  for r, row in enumerate(rows):
    start = 0
    for k, item in enumerate(row):
      for offset, (tokens, index_key) in enumerate(((item.chosen, "chosen_index"),
                                                    (item.rejected, "rejected_index"))):
        span = slice(start, start + len(tokens))
        out["tokens"][r, span] = tokens
        out["segment_ids"][r, span] = 2 * k + 1 + offset
        out["positions"][r, span] = np.arange(len(tokens))
        out[index_key][r, k] = start + len(tokens) - 1
        start += len(tokens)
      out["pair_mask"][r, k] = 1.0
      out["rating"][r, k] = item.pair.rating
      out["is_safety"][r, k] = int(item.pair.is_safety)
      out["chosen_safe"][r, k] = label(item.pair.chosen_safe)
      out["rejected_safe"][r, k] = label(item.pair.rejected_safe)
  return out
