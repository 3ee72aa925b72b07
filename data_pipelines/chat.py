"""Chat (SFT) data: read dialogues, encode them in the Llama 2 format, pack whole examples.

Dialogues are JSONL, one `{"messages": [{"role", "content"}, ...]}` per line. Each becomes the
token ids of the chat format with a loss mask on assistant tokens and their EOS (LLAMA2.md §4:
zero loss on prompt tokens). Examples are packed whole into rows of `seq_len` positions with
segment ids (1, 2, ... per example, 0 for padding) and positions restarting at 0, so attention
and loss never cross examples. An example longer than a row is an error naming its file and line,
or, with `skip_too_long`, dropped and counted.

Rows are dicts of numpy arrays [T]: tokens, targets (the next token), loss_mask (on targets),
segment_ids, positions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from data_pipelines.text import DataError, document_files, jsonl_rows

EncodeDialog = Callable[[Sequence[dict]], "object"]  # -> .tokens, .loss_mask


@dataclasses.dataclass
class PackReport:
  """What packing did: examples packed, rows made, and what was dropped and why."""

  examples: int = 0
  rows: int = 0
  dropped: dict = dataclasses.field(default_factory=dict)
  fill: float = 0.0  # fraction of positions holding real tokens


def read_dialogues(source: str) -> list[tuple[str, list[dict]]]:
  """[(where, messages)] from the JSONL files of `source`; `where` is "file:line"."""
  dialogues = []
  for path in document_files(source):
    for where, row in jsonl_rows(path):
      if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise DataError(f"{where}: needs a list field 'messages'")
      dialogues.append((where, row["messages"]))
  return dialogues


def encode_examples(dialogues, encode_dialog: EncodeDialog, seq_len: int,
                    skip_too_long: bool = False, report: PackReport | None = None):
  """Encodes dialogues -> [(tokens [L], loss_mask [L])], checking roles and lengths."""
  report = report if report is not None else PackReport()
  examples = []
  for where, messages in dialogues:
    try:
      encoded = encode_dialog(messages)
    except ValueError as e:
      raise DataError(f"{where}: {e}") from e
    if not encoded.loss_mask.any():
      raise DataError(f"{where}: no assistant answer to train on (a dialog must end with one)")
    if len(encoded.tokens) - 1 > seq_len:
      if not skip_too_long:
        raise DataError(f"{where}: {len(encoded.tokens)} tokens, longer than a row of "
                        f"{seq_len} + 1 (raise seq_len, or set skip_too_long to drop it)")
      report.dropped["longer than seq_len"] = report.dropped.get("longer than seq_len", 0) + 1
      continue
    examples.append((np.asarray(encoded.tokens, np.int32), np.asarray(encoded.loss_mask, np.int32)))
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
