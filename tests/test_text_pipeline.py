"""Text pretraining data: bad input named precisely, packing, exact resume across processes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import text


@pytest.mark.parametrize("content, error", [
    (b'{"text": "fine"}\n{"text": "broken"\n', r"bad.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n\n{"body": "x"}\n', r"bad.jsonl:3: needs a string field 'text'"),
    (b'{"text": "   "}\n', r"bad.jsonl:1: empty 'text'"),
    (b'{"text": "caf\xe9"}\n', r"bad.jsonl:1: invalid UTF-8"),
])
def test_bad_lines_fail_with_file_line_and_reason(tmp_path, content, error):
  (tmp_path / "bad.jsonl").write_bytes(content)
  with pytest.raises(text.DataError, match=error):
    text.read_documents(str(tmp_path))


def test_no_files_is_an_error(tmp_path):
  with pytest.raises(text.DataError, match="no .jsonl or .txt files"):
    text.read_documents(str(tmp_path))


def test_packing_concatenates_documents_with_bos_and_eos_and_drops_the_tail():
  rows = text.pack_documents([[10, 11], [12], [13, 14, 15]], seq_len=3, bos=1, eos=2)
  stream = [1, 10, 11, 2, 1, 12, 2, 1, 13, 14, 15, 2]
  assert rows.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
  batch = text.fixed_batches(rows, 3, 1)[0]
  assert batch["tokens"].tolist()[0] == [1, 10, 11] and batch["targets"].tolist()[0] == [10, 11, 2]
  assert batch["positions"].tolist()[1] == [0, 1, 2]


RESUME_SCRIPT = """
import json, sys
import numpy as np
from data_pipelines import text
rows = np.arange(64 * 9, dtype=np.int32).reshape(64, 9)
it = text.PackedBatches(rows, text.PackingConfig(seq_len=8, batch_size=4, seed=7))
state = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
if state is None:
  for _ in range(5): next(it)
  print(json.dumps({"state": it.get_state(), "next": [next(it)["tokens"].tolist() for _ in range(3)]}))
else:
  it.set_state(state)
  print(json.dumps([next(it)["tokens"].tolist() for _ in range(3)]))
"""


def test_iterator_state_restores_exactly_in_a_new_process():
  first = subprocess.run([sys.executable, "-c", RESUME_SCRIPT], capture_output=True, text=True,
                         check=True)
  saved = json.loads(first.stdout)
  second = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(saved["state"])],
                          capture_output=True, text=True, check=True)
  assert json.loads(second.stdout) == saved["next"]


def test_shuffling_is_deterministic_and_covers_every_row():
  rows = np.arange(32 * 5, dtype=np.int32).reshape(32, 5)
  take = lambda seed: [next(it)["tokens"][:, 0].tolist() for it in  # noqa: E731
                       [text.PackedBatches(rows, text.PackingConfig(4, 8, seed))] for _ in range(4)]
  a, b, c = take(0), take(0), take(1)
  assert a == b and a != c
  assert sorted(x for batch in a for x in batch) == list(range(0, 160, 5))


def test_process_rows_split_each_batch():
  rows = np.arange(32 * 5, dtype=np.int32).reshape(32, 5)
  whole = next(text.PackedBatches(rows, text.PackingConfig(4, 8, 0)))["tokens"]
  half = next(text.PackedBatches(rows, text.PackingConfig(4, 8, 0, rows=(4, 8))))["tokens"]
  np.testing.assert_array_equal(half, whole[4:8])


def test_with_skip_bad_rows_every_bad_kind_is_dropped_and_counted(tmp_path):
  (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "broken"\n{"body": "x"}\n'
                                     b'{"text": "  "}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
  (tmp_path / "b.txt").write_bytes(b"caf\xe9")
  (tmp_path / "c.txt").write_text("   \n")
  (tmp_path / "d.txt").write_text("A whole document.\n")
  with pytest.raises(text.DataError, match=r"b.txt: invalid UTF-8"):
    text.read_documents(str(tmp_path / "b.txt"))
  with pytest.raises(text.DataError, match=r"c.txt: empty file"):
    text.read_documents(str(tmp_path / "c.txt"))
  bad = text.BadRows(skip=True)
  assert text.read_documents(str(tmp_path), bad) == ["fine", "also fine", "A whole document.\n"]
  assert bad.dropped == {"malformed JSON": 1, "missing field": 1, "empty text": 2,
                         "invalid UTF-8": 2}
  assert bad.first["missing field"].endswith("a.jsonl:3: needs a string field 'text'")
  assert bad.summary() == ("dropped 6 rows: 2 empty text, 2 invalid UTF-8, 1 malformed JSON, "
                           "1 missing field")
