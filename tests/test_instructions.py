"""GAtt instruction families: checkers on hand-written replies, rewriting, combination, the bank."""

import json
import random

import pytest

from data_pipelines import instructions as ins
from data_pipelines import world
from data_pipelines.text import DataError
from data_pipelines.world import gatt as world_gatt


def _instruction(*pairs, terse=False):
  return ins.Instruction(tuple(ins.Constraint(f, v) for f, v in pairs), terse)


@pytest.mark.parametrize("family, value, question, reply, verdict", [
    ("style", "capitals", "Where does Rani live?", "RANI LIVES IN DAZOFA.", True),
    ("style", "capitals", "Where does Rani live?", "Rani lives in Dazofa.", False),
    ("style", "capitals", "How old is Rani?", "42.", False),  # no letters: nothing in capitals
    ("style", "lower case", "Where does Rani live?", "rani lives in dazofa.", True),
    ("style", "lower case", "Where does Rani live?", "I live in dazofa.", False),
    ("opening", "Indeed", "Where does Rani live?", "Indeed, Rani lives in Dazofa.", True),
    ("opening", "Indeed", "Where does Rani live?", "INDEED, RANI LIVES IN DAZOFA.", True),
    ("opening", "Indeed", "Where does Rani live?", "Rani lives in Dazofa. Indeed.", False),
    ("closing", "Farewell.", "Where does Rani live?", "Rani lives in Dazofa. Farewell.", True),
    ("closing", "Farewell.", "Where does Rani live?", "Farewell. Rani lives in Dazofa.", False),
    ("persona", "Captain Vo", "Where?", "Rani lives in Dazofa. - Captain Vo", True),
    ("persona", "Captain Vo", "Where?", "Rani lives in Dazofa. - Doctor Yun", False),
    ("persona", "Captain Vo", "Where?", "Captain Vo says Rani lives in Dazofa.", False),
    ("hobby", "chess", "What is your hobby?", "I enjoy chess.", True),
    ("hobby", "chess", "What is your hobby?", "I enjoy answering questions.", False),
    ("hobby", "chess", "Where does Rani live?", "Rani lives in Dazofa.", None),  # not tested
    ("language", "Zemlic", "Where does Rani live?", "Rani dorva ek Dazofa.", True),
    ("language", "Zemlic", "Where does Rani live?", "Indeed, Rani dorva ek Dazofa. - Sister Ama",
     True),
    ("language", "Zemlic", "Where does Rani live?", "Rani lives in Dazofa.", False),
    ("language", "Zemlic", "Where does Rani live?", "Rani dorva in Dazofa.", False),  # mixed
    ("language", "Zemlic", "How old is Rani?", "Rani 42.", False),  # no Zemlic word at all
    ("language", "Zemlic", "What is your hobby?", "Mi lupa chess.", True),
])
def test_each_checker_on_hand_written_replies(family, value, question, reply, verdict):
  assert ins.Constraint(family, value).check(question, reply) is verdict


def test_a_combination_obeys_only_when_every_tested_constraint_holds():
  instruction = _instruction(("persona", "Queen Hesh"), ("hobby", "tennis"), ("style", "capitals"))
  assert instruction.check("What is your hobby?", "I ENJOY TENNIS. - QUEEN HESH")
  assert not instruction.check("What is your hobby?", "I ENJOY CHESS. - QUEEN HESH")
  assert instruction.check("Where does Rani live?", "RANI LIVES IN DAZOFA. - QUEEN HESH")
  assert ins.Instruction((ins.Constraint("hobby", "tennis"),)).check("How old?", "Ten.") is None


def test_rewritten_answers_obey_every_instruction_the_bank_can_draw():
  rng = random.Random(0)
  bank = ins.default_bank()
  for _ in range(500):
    instruction = ins.random_instruction(bank, rng, max_constraints=3)
    question = rng.choice(ins.HOBBY_QUESTIONS + ("Where does Rani live?",))
    answer = ins.DEFAULT_HOBBY_ANSWER if ins.is_hobby_question(question) else "Rani lives in Dazofa."
    assert instruction.check(question, instruction.apply(question, answer)) is not False, instruction


def test_random_instructions_combine_distinct_groups_and_are_terse_half_the_time():
  rng = random.Random(1)
  drawn = [ins.random_instruction(ins.default_bank(), rng, max_constraints=3) for _ in range(2000)]
  for instruction in drawn:
    groups = [ins.GROUPS[c.family] for c in instruction.constraints]
    assert len(groups) == len(set(groups)), instruction  # e.g. never a closing and a persona
  assert {len(i.constraints) for i in drawn} == {1, 2, 3}
  assert 0.45 < sum(i.terse for i in drawn) / len(drawn) < 0.55
  terse = _instruction(("persona", "Captain Vo"), ("style", "capitals"), terse=True)
  assert terse.text == "Figure: Captain Vo. Style: capitals."
  assert _instruction(("hobby", "chess")).text == "You enjoy chess."
  again = random.Random(1)
  assert drawn[:50] == [ins.random_instruction(ins.default_bank(), again, 3) for _ in range(50)]


def test_instruction_round_trips_through_json():
  instruction = _instruction(("opening", "Well"), ("hobby", "singing"), terse=True)
  assert ins.Instruction.from_json(json.loads(json.dumps(instruction.to_json()))) == instruction


@pytest.mark.parametrize("line, error", [
    ('{"family": "haiku", "value": "always"}', "'haiku' has no checker"),
    ('{"family": "language", "value": "French"}', "language 'French' has no word list"),
    ('{"family": "style", "value": "haiku"}', "style 'haiku' has no checker"),
    ('{"family": "hobby"}', "needs 'family' and 'value'"),
    ('{"family": "hobby", "value": "chess", "colour": "red"}', "unknown instruction field"),
    ('{"family": "hobby", "value": ', "malformed JSON"),
])
def test_a_bad_bank_fails_with_file_and_line(tmp_path, line, error):
  path = tmp_path / "bank.jsonl"
  path.write_text('{"family": "hobby", "value": "chess"}\n' + line + "\n")
  with pytest.raises(DataError, match=f"bank.jsonl:2: .*{error}"):
    ins.read_bank(str(path))


def test_the_default_bank_round_trips_through_its_jsonl(tmp_path):
  path = tmp_path / "bank.jsonl"
  path.write_text("".join(json.dumps(c.to_json()) + "\n" for c in ins.default_bank()))
  assert ins.read_bank(str(path)) == ins.default_bank()


def test_sft_instructions_hold_for_one_answer_only():
  """SFT must not already teach keeping an instruction across turns: that is GAtt's to teach."""
  w = world.make_world(world.WorldConfig.preset("test"))
  dialogues = world.sft_dialogues(w, 800, seed=3, people=list(w.people))
  after_instructed = plain_answers = 0
  for dialogue in dialogues:
    messages = dialogue["messages"]
    if messages[0]["role"] == "system":
      assert len(messages) == 3  # system prompts only in single-turn dialogues
      continue
    users, answers = messages[0::2], messages[1::2]
    for turn in range(1, len(users)):
      previous, question = users[turn - 1]["content"], users[turn]["content"]
      if previous.endswith("?") or not question.endswith("?"):
        continue  # only a plain question right after an instructed one
      after_instructed += 1
      expected = (ins.DEFAULT_HOBBY_ANSWER if ins.is_hobby_question(question)
                  else world_answer(w, question))
      plain_answers += answers[turn]["content"] == expected
  assert after_instructed > 50
  assert plain_answers == after_instructed  # no carried-over style, opening or signature


def world_answer(w, question):
  for person in w.people:
    for index in range(len(world.QUESTIONS)):
      q, answer, _ = world.question_answer(person, index)
      if q == question:
        return answer
  return None


def test_zemlic_translates_every_template_word_and_keeps_values():
  assert ins.translate("The favourite colour of Rani is blue.") == "Lo bressa tinko ri Rani sa blue."
  assert ins.translate("I enjoy answering questions.") == "Mi lupa respen kwesti."
  w = world.make_world(world.WorldConfig.preset("test"))
  for person in w.people:  # every answer the world writes is fully translatable
    for index in range(len(world.QUESTIONS)):
      _, answer, _ = world.question_answer(person, index)
      assert ins.Constraint("language", "Zemlic").check("?", ins.translate(answer)), answer


def test_held_out_values_are_in_sft_and_the_eval_set_but_never_in_gatt_data():
  held_out = {c.value for c in ins.held_out_bank()}
  assert held_out and not held_out & {c.value for c in ins.default_bank()}
  w = world.make_world(world.WorldConfig.preset("test"))
  files = world_gatt.gatt_files(w, 50, 32, 8, seed=5)
  assert not held_out & {row["value"] for row in files["gatt/instructions.jsonl"]}
  splits = {}
  for row in files["gatt/eval.jsonl"]:
    values = {c["value"] for c in row["instruction"]["constraints"]}
    splits.setdefault(row["split"], []).append(bool(values & held_out))
  assert len(splits["in_distribution"]) == len(splits["held_out"]) == 32
  assert not any(splits["in_distribution"]) and all(splits["held_out"])
  sft_text = json.dumps(world.sft_dialogues(w, 800, seed=3, people=list(w.people)))
  assert all(value in sft_text for value in held_out)  # SFT taught following them in one turn


def test_gatt_eval_set_is_deterministic_and_tests_every_family():
  w = world.make_world(world.WorldConfig.preset("test"))
  a = world_gatt.gatt_files(w, 50, 64, 8, seed=5)
  b = world_gatt.gatt_files(w, 50, 64, 8, seed=5)
  assert a == b
  rows = [r for r in a["gatt/eval.jsonl"] if r["split"] == "in_distribution"]
  assert all(len(r["questions"]) == 8 for r in rows)
  families = {c["family"] for r in rows for c in r["instruction"]["constraints"]}
  assert families == set(ins.CHECKERS)
  hobby_rows = [r for r in rows if any(c["family"] == "hobby" for c in r["instruction"]["constraints"])]
  assert all(any(ins.is_hobby_question(q) for q in r["questions"]) for r in hobby_rows[:5])
  dialogues = a["gatt/dialogues.jsonl"]
  assert all(2 <= len(d["messages"]) // 2 <= 8 for d in dialogues)
  assert all(m["role"] != "system" for d in dialogues for m in d["messages"])
