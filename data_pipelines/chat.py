"""Chat (SFT) data: read dialogues, encode them in the Llama 2 format, pack whole examples.

Dialogues are JSONL, one `{"messages": [{"role", "content"}, ...]}` per line. Each becomes the
token ids of the chat format with a loss mask on assistant tokens and their EOS (LLAMA2.md §4:
zero loss on prompt tokens). Examples are packed whole into rows of `seq_len` positions with
segment ids (1, 2, ... per example, 0 for padding) and positions restarting at 0, so attention
and loss never cross examples. Bad input (malformed JSON, a missing field, roles out of order,
empty text, invalid UTF-8, an example longer than a row) is an error naming its file and line,
or, with a skipping `text.BadRows`, dropped and counted by kind.

Rows are dicts of numpy arrays [T]: tokens, targets (the next token), loss_mask (on targets),
segment_ids, positions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from data_pipelines.text import BadRows, document_files, jsonl_rows
from lm.tokenizer import DialogError, check_dialog

EncodeDialog = Callable[[Sequence[dict]], "object"]  # -> .tokens, .loss_mask


@dataclasses.dataclass
class PackReport:
  """What packing did: examples packed, rows made (what was dropped is in `text.BadRows`)."""

  examples: int = 0
  rows: int = 0
  fill: float = 0.0  # fraction of positions holding real tokens
  mixed_in: int = 0  # dialogues added from a second source (SFT's safety demonstrations)


def valid_messages(where: str, messages, bad: BadRows, ends_with: str) -> bool:
  """Checks one dialog (roles, contents, control tags) and that its last turn is `ends_with`
  ("assistant" for training examples, "user" for prompts); a failure goes to `bad`."""
  if not isinstance(messages, list):
    bad(where, "missing field", "needs a list field 'messages'")
    return False
  try:
    check_dialog(messages)
  except DialogError as e:
    bad(where, e.kind, str(e))
    return False
  if messages[-1]["role"] != ends_with:
    what = ("an assistant answer to train on" if ends_with == "assistant"
            else "a user turn to answer")
    bad(where, "roles out of order", f"the dialog must end with {what}")
    return False
  return True


def read_dialogues(source: str, bad: BadRows | None = None) -> list[tuple[str, list[dict]]]:
  """[(where, messages)] of the valid training dialogues in the JSONL files of `source`
  ("file:line"; each ends with an assistant answer); bad rows go to `bad`."""
  bad = bad if bad is not None else BadRows()
  dialogues = []
  for path in document_files(source):
    for where, row in jsonl_rows(path, bad=bad):
      messages = row.get("messages") if isinstance(row, dict) else None
      if valid_messages(where, messages, bad, "assistant"):
        dialogues.append((where, messages))
  return dialogues


def fits(where: str, positions: int, seq_len: int, bad: BadRows) -> bool:
  """Whether an example needing `positions` row positions fits a row of `seq_len`."""
  if positions <= seq_len:
    return True
  bad(where, "longer than seq_len",
      f"needs {positions} positions, longer than a row of {seq_len} (or raise seq_len)")
  return False


def encode_examples(dialogues, encode_dialog: EncodeDialog, seq_len: int,
                    bad: BadRows | None = None):
  """Encodes dialogues -> [(tokens [L], loss_mask [L])]; one too long for a row goes to `bad`."""
  bad = bad if bad is not None else BadRows()
  examples = []
  for where, messages in dialogues:
    encoded = encode_dialog(messages)
    # Inputs and targets are the example shifted by one: L tokens fill L - 1 positions.
    if fits(where, len(encoded.tokens) - 1, seq_len, bad):
      examples.append((np.asarray(encoded.tokens, np.int32),
                       np.asarray(encoded.loss_mask, np.int32)))
  return examples


def pack_examples(examples, seq_len: int, report: PackReport | None = None) -> dict[str, np.ndarray]:
  """Packs examples whole, in order, into rows: dict of [N, seq_len] arrays."""
  report = report if report is not None else PackReport()
  rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
  used = 0
  for tokens, mask in examples:
    need = len(tokens) - 1
    if used + need > seq_len:
      rows.append([])
      used = 0
    rows[-1].append((tokens, mask))
    used += need
  arrays = {name: np.zeros((len(rows), seq_len), np.int32)
            for name in ("tokens", "targets", "segment_ids", "positions")}
  arrays["loss_mask"] = np.zeros((len(rows), seq_len), np.float32)
  for r, row in enumerate(rows):
    start = 0
    for segment, (tokens, mask) in enumerate(row, start=1):
      n = len(tokens) - 1
      span = slice(start, start + n)
      arrays["tokens"][r, span] = tokens[:-1]
      arrays["targets"][r, span] = tokens[1:]
      arrays["loss_mask"][r, span] = mask[1:]
      arrays["segment_ids"][r, span] = segment
      arrays["positions"][r, span] = np.arange(n)
      start += n
  report.examples += len(examples)
  report.rows += len(rows)
  report.fill = float((arrays["segment_ids"] > 0).mean())
  return arrays
