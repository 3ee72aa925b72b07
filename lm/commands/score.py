"""`lm score`: reward-model scores of dialogues or preference pairs, on the paper's [0, 1] scale.

  lm score --checkpoint=RM_DIR --input=FILE.jsonl --output=OUT.jsonl [--batch_size=16]

Each input row is a dialogue ending with an assistant turn ({"messages": [...]}) or a preference
pair (any form data_pipelines/preferences.py reads); the output has one row per input row, in
order: {"line": N, "score": s} or {"line": N, "chosen_score": s1, "rejected_score": s2}, scores
sigmoid(raw). A bad row fails naming file:line, or with --skip_bad_rows is left out (its line
number is then missing from the output) and counted. Runs through lm/scoring.py on a mesh of
every device.
"""

from __future__ import annotations

import json

from absl import flags

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A reward-model directory (scalar head).")
INPUT = flags.DEFINE_string("input", None, "JSONL of dialogues or preference pairs.")
OUTPUT = flags.DEFINE_string("output", None, "Where to write the scores (JSONL, atomically).")
BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Row length (default: the model's max_seq_len).")
SKIP = flags.DEFINE_bool("skip_bad_rows", False, "Leave bad rows out (counted) instead of failing.")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def read_rows(path: str, bad):
  """(line number, sequences) per valid row: one dialogue, or a pair's chosen and rejected."""
  from data_pipelines import chat, preferences, text
  rows = []
  for where, row in text.jsonl_rows(path, bad=bad):
    line = int(where.rsplit(":", 1)[1])
    if isinstance(row, dict) and "chosen" in row:
      pair = preferences.pair_from_row(where, row, bad)
      if pair is not None:
        rows.append((line, where, [list(pair.messages) + [{"role": "assistant", "content": a}]
                                   for a in (pair.chosen, pair.rejected)]))
    elif isinstance(row, dict) and chat.valid_messages(where, row.get("messages"), bad,
                                                       "assistant"):
      rows.append((line, where, [row["messages"]]))
    elif not isinstance(row, dict):
      bad(where, "missing field", "a row is a JSON object: a dialogue or a preference pair")
  return rows


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm score: unexpected arguments {argv[1:]}")
  for flag in (CHECKPOINT, INPUT, OUTPUT):
    if not flag.value:
      raise SystemExit(f"lm score: --{flag.name} is required")

  import os

  import numpy as np

  from data_pipelines import text
  from lm import checkpoints, roles, scoring, sharding
  from lm.tokenizer import Tokenizer

  cfg, head = checkpoints.read_model_info(CHECKPOINT.value)
  if head != "scalar":
    raise SystemExit(f"lm score: {CHECKPOINT.value} holds a {head!r} model, not a reward model "
                     f"(scalar head)")
  tokenizer = Tokenizer(os.path.join(CHECKPOINT.value, checkpoints.TOKENIZER_FILE))
  seq_len = SEQ_LEN.value or cfg.max_seq_len
  bad = text.BadRows(SKIP.value)
  rows, sequences, owners = read_rows(INPUT.value, bad), [], []
  for line, where, dialogues in rows:
    encoded = [np.asarray(tokenizer.encode_dialog(d).tokens, np.int32) for d in dialogues]
    if any(len(e) > seq_len for e in encoded):
      bad(where, "longer than seq_len", f"{max(map(len, encoded))} tokens, longer than "
          f"--seq_len={seq_len}")
      continue
    owners.append((line, len(sequences), len(encoded)))
    sequences += encoded
  mesh = sharding.make_mesh(sharding.MeshConfig())
  role = roles.load("reward", CHECKPOINT.value, mesh, head="scalar", step=STEP.value)
  scores = scoring.unit(scoring.score_sequences(role, sequences, seq_len, BATCH.value))
  out = []
  for line, start, count in owners:
    if count == 1:
      out.append({"line": line, "score": float(scores[start])})
    else:
      out.append({"line": line, "chosen_score": float(scores[start]),
                  "rejected_score": float(scores[start + 1])})
  checkpoints.write_atomically(OUTPUT.value, "".join(json.dumps(r) + "\n" for r in out))
  skipped = f"; skipped {bad.dropped}" if bad.dropped else ""
  print(f"lm score: {len(out)} rows scored -> {OUTPUT.value}{skipped}")
