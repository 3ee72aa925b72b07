"""The synthetic world: deterministic, consistent facts, probes with the right answers."""

import json
import re

from data_pipelines import world


def test_same_seed_same_world_other_seed_other_world(tmp_path):
  a = world.write_world(str(tmp_path / "a"), world.WorldConfig.preset("test", seed=0))
  b = world.write_world(str(tmp_path / "b"), world.WorldConfig.preset("test", seed=0))
  c = world.write_world(str(tmp_path / "c"), world.WorldConfig.preset("test", seed=1))
  read = lambda d: (tmp_path / d / "pretrain" / "train.jsonl").read_text()  # noqa: E731
  assert a == b and read("a") == read("b") and read("a") != read("c")
  assert c["people"] == 16 and a["train_documents"] == 1500


def test_every_stated_fact_is_true_and_every_probe_answer_is_right(tmp_path):
  cfg = world.WorldConfig.preset("test")
  w = world.make_world(cfg)
  town_of = {p.name: p.town for p in w.people}
  pet_of = {p.name: p.pet for p in w.people}
  world.write_world(str(tmp_path), cfg)
  docs = [json.loads(l)["text"] for l in (tmp_path / "pretrain" / "train.jsonl").read_text().splitlines()]
  checked = 0
  for doc in docs:
    for sentence in doc.split(". "):
      words = sentence.rstrip(".").split()
      if len(words) == 4 and words[1:3] == ["lives", "in"]:
        assert town_of[words[0]] == words[3]
        checked += 1
      if len(words) == 4 and words[1:3] == ["keeps", "a"] and words[0] in pet_of:
        assert pet_of[words[0]] == words[3]
        checked += 1
  assert checked > 100
  for probe in (json.loads(l) for l in (tmp_path / "probes.jsonl").read_text().splitlines()):
    name = probe["prompt"].split()[0]
    assert probe["answer"] in (town_of[name], pet_of[name])


def test_names_are_made_up_and_unique():
  w = world.make_world(world.WorldConfig.preset("tiny"))
  names = [p.name for p in w.people] + list(w.towns)
  assert len(set(names)) == len(names) == 48 + 8


def test_sft_names_everyone_but_states_facts_only_about_its_own_people(tmp_path):
  cfg = world.WorldConfig.preset("test")
  w = world.make_world(cfg)
  world.write_world(str(tmp_path), cfg)
  _, held_out = world.sft_people(w)
  answers = [set(re.findall(r"\w+", m["content"]))
             for line in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"] if m["role"] == "assistant"]
  for person in held_out:
    mentions = [words for words in answers if person.name in words]
    # The name is used (so SFT can say it when asked about this person) ...
    assert mentions, person.name
    # ... but no answer carries one of the person's facts (the QA eval asks for them).
    facts = {person.town, person.pet, person.color, str(person.age), person.trade}
    assert not [words for words in mentions if facts & words], person.name
