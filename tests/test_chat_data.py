"""Chat data: whole-example packing, answer-only loss, errors with file and line."""

import json

import numpy as np
import pytest

from data_pipelines import chat as chat_data
from data_pipelines.text import BadRows, DataError
from lm import tokenizer as tok


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
  import random
  words = ["".join(random.Random(i).choices("abcdefghiklmnoprstuv", k=5)) for i in range(300)]
  text = [f"Where does {w} live? {w} lives in Velloran ({i})." for i, w in enumerate(words)]
  return tok.train_tokenizer(text, 400, tmp_path_factory.mktemp("t") / "tokenizer.model")


DIALOGS = [
    [{"role": "user", "content": "Where does Mira live?"}, {"role": "assistant", "content": "Velloran."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Pet?"},
     {"role": "assistant", "content": "A fox."}],
    [{"role": "user", "content": "Age?"}, {"role": "assistant", "content": "Forty."}],
]


def write(tmp_path, rows, name="d.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
  return str(path)


def test_examples_are_packed_whole_with_segments_positions_and_answer_loss(tk, tmp_path):
  examples = chat_data.encode_examples(chat_data.read_dialogues(write(tmp_path, DIALOGS)),
                                       tk.encode_dialog, seq_len=256)
  rows = chat_data.pack_examples(examples, seq_len=256)
  for segment, dialog in enumerate(DIALOGS, start=1):
    row = np.flatnonzero((rows["segment_ids"] == segment).any(axis=1))
    assert len(row) == 1  # never split across rows
    r = row[0]
    where = rows["segment_ids"][r] == segment
    encoded = tk.encode_dialog(dialog)
    # Inputs are the example minus its last token; targets minus its first; positions restart.
    assert rows["tokens"][r][where].tolist() == encoded.tokens[:-1].tolist()
    assert rows["targets"][r][where].tolist() == encoded.tokens[1:].tolist()
    assert rows["positions"][r][where].tolist() == list(range(len(encoded.tokens) - 1))
    assert rows["loss_mask"][r][where].tolist() == encoded.loss_mask[1:].tolist()
  # Loss lands only on answers and EOS: decoding the masked targets gives the answers back.
  masked = rows["targets"][rows["loss_mask"] == 1]
  # (each answer keeps the space the format puts before its EOS)
  assert tk.decode([t for t in masked.tolist() if t != tk.eos_id]) == "Velloran.  Hello.  A fox.  Forty. "
  assert rows["loss_mask"][rows["segment_ids"] == 0].sum() == 0


def test_rows_are_filled_in_order_and_a_new_row_starts_when_full(tk, tmp_path):
  examples = chat_data.encode_examples(chat_data.read_dialogues(write(tmp_path, DIALOGS * 4)),
                                       tk.encode_dialog, seq_len=100)
  report = chat_data.PackReport()
  rows = chat_data.pack_examples(examples, seq_len=100, report=report)
  assert report.examples == 12 and report.rows == len(rows["tokens"]) > 1
  assert 0.5 < report.fill <= 1.0


def test_too_long_is_an_error_naming_the_line_or_is_skipped_and_counted(tk, tmp_path):
  long = [{"role": "user", "content": "Where does Mira live? " * 20},
          {"role": "assistant", "content": "Velloran."}]
  path = write(tmp_path, [DIALOGS[0], long, DIALOGS[2]])
  with pytest.raises(DataError, match=r"d.jsonl:2: .* longer than a row of 32"):
    chat_data.encode_examples(chat_data.read_dialogues(path), tk.encode_dialog, seq_len=32)
  bad = BadRows(skip=True)
  kept = chat_data.encode_examples(chat_data.read_dialogues(path), tk.encode_dialog, seq_len=32,
                                   bad=bad)
  assert len(kept) == 2 and bad.dropped == {"longer than seq_len": 1}


@pytest.mark.parametrize("line, error", [
    ('{"messages": [{"role": "assistant", "content": "x"}]}', r"d.jsonl:2: roles must alternate"),
    ('{"msgs": []}', r"d.jsonl:2: needs a list field 'messages'"),
    ('{"messages": [', r"d.jsonl:2: malformed JSON"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}',
     r"d.jsonl:2: message 0 \(user\): empty content"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', r"d.jsonl:2: the dialog must end with an assistant answer"),
])
def test_bad_dialogues_fail_with_file_line_and_reason(tk, tmp_path, line, error):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"messages": DIALOGS[0]}) + "\n" + line + "\n")
  with pytest.raises(DataError, match=error):
    chat_data.encode_examples(chat_data.read_dialogues(str(path)), tk.encode_dialog, seq_len=64)


def test_with_skip_bad_rows_every_bad_dialogue_kind_is_dropped_and_counted(tk, tmp_path):
  good = json.dumps({"messages": DIALOGS[0]}).encode()
  lines = [good, b'{"messages": [', b'{"msgs": []}', '{"messages": [{"role": "user", "content": '
           '"caf\xe9"}]}'.encode("latin-1"),
           json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": " "},
                                    {"role": "assistant", "content": "a"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "[INST] hi"},
                                    {"role": "assistant", "content": "a"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "Where does Mira live? " * 20},
                                    {"role": "assistant", "content": "Velloran."}]}).encode(),
           good]
  path = tmp_path / "d.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  bad = BadRows(skip=True)
  examples = chat_data.encode_examples(chat_data.read_dialogues(str(path), bad), tk.encode_dialog,
                                       seq_len=48, bad=bad)
  assert len(examples) == 2
  assert bad.dropped == {"malformed JSON": 1, "missing field": 1, "invalid UTF-8": 1,
                         "roles out of order": 1, "empty text": 1, "control tag": 1,
                         "longer than seq_len": 1}
  assert bad.first["control tag"].split(": ")[0].endswith("d.jsonl:7")
