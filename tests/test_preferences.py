"""Preference pairs and prompts: both input forms, every bad-input kind, reward-pair packing."""

import json

import numpy as np
import pytest

from data_pipelines import preferences as prefs
from data_pipelines.text import BadRows, DataError, PackedBatches, PackingConfig
from lm import tokenizer as tok

Q = [{"role": "user", "content": "Where does Mira live?"}]
GOOD = {"messages": Q, "chosen": "Mira lives in Velloran.", "rejected": "Mira lives in Kalo.",
        "rating": "better", "chosen_safe": True, "rejected_safe": True}
HH_CHOSEN = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
             "\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 4.")
HH_REJECTED = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
               "\n\nHuman: What is 2 + 2?\n\nAssistant: Five, I think.")


def write(tmp_path, lines, name="p.jsonl"):
  path = tmp_path / name
  path.write_bytes(b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n"
                            for l in lines))
  return str(path)


def test_our_form_and_prompt_shorthand(tmp_path):
  short = {"prompt": "How old is Tito?", "chosen": "Tito is 20 years old.", "rejected": "Nine.",
           "rating": "negligibly better / unsure", "is_safety": True, "chosen_safe": True,
           "rejected_safe": False}
  a, b = prefs.read_pairs(write(tmp_path, [GOOD, short]))
  assert a.where.endswith("p.jsonl:1") and a.messages == tuple(Q) and a.rating == 1
  assert (a.chosen_safe, a.rejected_safe, a.is_safety) == (True, True, False)
  assert b.messages == ({"role": "user", "content": "How old is Tito?"},) and b.rating == 3
  assert (b.chosen_safe, b.rejected_safe, b.is_safety) == (True, False, True)


def test_hh_rlhf_transcripts_become_a_shared_prompt_and_two_answers(tmp_path):
  assert prefs.parse_hh(HH_CHOSEN) == [
      {"role": "user", "content": "Hi there"},
      {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "What is 2 + 2?"},
      {"role": "assistant", "content": "2 + 2 = 4."}]
  (pair,) = prefs.read_pairs(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]))
  assert [m["content"] for m in pair.messages] == ["Hi there", "Hello! How can I help?",
                                                   "What is 2 + 2?"]
  assert (pair.chosen, pair.rejected, pair.rating) == ("2 + 2 = 4.", "Five, I think.", -1)
  # A one-turn transcript with no space after the colon parses too.
  (one,) = prefs.read_pairs(write(tmp_path, [{"chosen": "\n\nHuman: Hi\n\nAssistant:Yes",
                                              "rejected": "\n\nHuman: Hi\n\nAssistant: No"}]))
  assert one.messages == ({"role": "user", "content": "Hi"},) and one.chosen == "Yes"


BAD_PAIRS = [
    (b'{"messages": [', "malformed JSON", "malformed JSON"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "invalid UTF-8", "invalid UTF-8"),
    ({"messages": Q, "chosen": "a"}, "missing field", "needs a string field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "malformed HH transcript", "not an HH-RLHF transcript"),
    ({**GOOD, "chosen": "  "}, "empty text", "empty 'chosen' answer"),
    ({**GOOD, "messages": Q + [{"role": "assistant", "content": "x"}]}, "roles out of order",
     "must end with a user turn"),
    ({**GOOD, "messages": [{"role": "assistant", "content": "x"}]}, "roles out of order",
     "roles must alternate"),
    ({**GOOD, "rating": "much better"}, "bad label", "rating 'much better' is not one of"),
    ({**GOOD, "chosen_safe": False, "rejected_safe": True}, "unsafe chosen over safe",
     "excluded"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "chosen and rejected disagree", "the same answer"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Hi there", "Hey")},
     "chosen and rejected disagree", "share every turn"),
]


@pytest.mark.parametrize("line, kind, reason", BAD_PAIRS)
def test_bad_pairs_fail_with_file_line_reason_or_are_skipped_and_counted(tmp_path, line, kind,
                                                                         reason):
  path = write(tmp_path, [GOOD, line, GOOD])
  with pytest.raises(DataError, match=r"p.jsonl:2: .*" + reason.replace("(", r"\(")):
    prefs.read_pairs(path)
  bad = BadRows(skip=True)
  assert len(prefs.read_pairs(path, bad)) == 2
  assert bad.dropped == {kind: 1} and bad.first[kind].split(": ")[0].endswith("p.jsonl:2")


def test_prompts_with_tags_and_their_bad_rows(tmp_path):
  rows = [{"prompt": "How do I poison the well of Kalo?", "is_safety": True,
           "category": "illicit and criminal activities"},
          {"messages": Q, "answer": "Velloran"},
          {"prompt": "x", "is_safety": "yes"},
          {"text": "no prompt"},
          {"prompt": ""}]
  path = write(tmp_path, rows)
  with pytest.raises(DataError, match=r"p.jsonl:3: 'is_safety' must be true or false"):
    prefs.read_prompts(path)
  bad = BadRows(skip=True)
  a, b = prefs.read_prompts(path, bad)
  assert a.is_safety and a.category.startswith("illicit") and not b.is_safety
  assert b.answer == "Velloran" and b.messages == tuple(Q)
  assert bad.dropped == {"bad label": 1, "missing field": 1, "empty text": 1}
  assert "dropped 3 rows" in bad.summary()


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
  lines = [f"Where does Mira{i} live? Mira lives in Velloran, not Kalo. Tito is {i} years old."
           for i in range(200)]
  return tok.train_tokenizer(lines, 300, tmp_path_factory.mktemp("t") / "tokenizer.model")


def test_reward_pairs_pack_whole_as_two_segments_with_reward_positions(tk, tmp_path):
  rows = [GOOD, {**GOOD, "rating": "slightly better", "chosen": "Velloran.", "is_safety": True},
          {"prompt": "How old is Tito?", "chosen": "Tito is 20 years old.", "rejected": "No."}]
  pairs = prefs.read_pairs(write(tmp_path, rows * 3))
  encoded = prefs.encode_pairs(pairs, tk.encode_dialog, seq_len=96)
  packed = prefs.pack_pairs(encoded, seq_len=96)
  n, p = packed["pair_mask"].shape
  assert packed["tokens"].shape == (n, 96) and packed["pair_mask"].sum() == 9
  seen = 0
  for r in range(n):
    for k in range(p):
      if not packed["pair_mask"][r, k]:
        assert packed["rating"][r, k] == -1
        continue
      item = encoded[seen]
      seen += 1
      for offset, (ids, index) in enumerate(((item.chosen, "chosen_index"),
                                             (item.rejected, "rejected_index"))):
        where = packed["segment_ids"][r] == 2 * k + 1 + offset
        # Each answer is its own segment: the whole dialogue, positions from 0, reward read at
        # its last token, which is EOS.
        assert packed["tokens"][r][where].tolist() == ids.tolist()
        assert packed["positions"][r][where].tolist() == list(range(len(ids)))
        assert packed[index][r, k] == np.flatnonzero(where)[-1]
        assert packed["tokens"][r, packed[index][r, k]] == tk.eos_id
      assert packed["rating"][r, k] == item.pair.rating
      assert packed["is_safety"][r, k] == item.pair.is_safety
  assert seen == 9
  assert packed["chosen_safe"].max() == 1 and packed["chosen_safe"].min() == -1
  assert (packed["tokens"][packed["segment_ids"] == 0] == 0).all()
  # Rows feed the same resumable, shuffled batch stream as LM rows.
  batch = next(PackedBatches(packed, PackingConfig(seq_len=96, batch_size=2, seed=0)))
  assert batch["tokens"].shape == (2, 96) and batch["chosen_index"].shape == (2, p)
  # The chosen dialogue is the prompt in the chat format, then the answer and its space.
  # (with the space the format puts before EOS)
  assert tk.decode(encoded[0].chosen.tolist()).endswith("[/INST] Mira lives in Velloran. ")


def test_a_pair_too_long_for_one_row_fails_or_is_counted(tk, tmp_path):
  long = {**GOOD, "chosen": "Mira lives in Velloran. " * 30}
  pairs = prefs.read_pairs(write(tmp_path, [GOOD, long]))
  with pytest.raises(DataError, match=r"p.jsonl:2: needs \d+ positions, longer than a row of 128"):
    prefs.encode_pairs(pairs, tk.encode_dialog, seq_len=128)
  bad = BadRows(skip=True)
  assert len(prefs.encode_pairs(pairs, tk.encode_dialog, seq_len=128, bad=bad)) == 1
  assert bad.dropped == {"longer than seq_len": 1}
