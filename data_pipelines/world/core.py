"""The synthetic world behind "Llama 2 in miniature": made-up people, towns and facts.

Deterministic by seed and sized by `WorldConfig`, so a tiny model can learn it on a CPU in
minutes and every answer has a ground truth. Made-up names keep the tokenizer honest (no help
from real-world priors).

This module holds the world itself and what is made straight from it: pretraining documents,
fact probes, SFT dialogues and the held-out question set. It imports none of the world's other
modules (gatt, preferences, safety build on it), so they can all import it; the package's
`write_world` writes everything to disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Sequence

from data_pipelines import instructions

SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "no", "su", "ti", "da", "re", "ul", "os", "an", "be",
             "ri", "fa", "zo", "el", "ma", "ki", "to", "pe", "lu", "ni")
PETS = ("cat", "dog", "fox", "owl", "goat", "hare", "crow", "toad")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
TRADES = ("baker", "smith", "weaver", "fisher", "potter", "miller", "healer", "farmer")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """How big the world is and how much text describes it."""

  seed: int = 0
  people: int = 48
  towns: int = 8
  train_documents: int = 6000
  eval_documents: int = 200
  sft_dialogues: int = 8000  # about 3 epochs in the tiny chat preset's 250 SFT steps
  preference_pairs: int = 3000  # helpfulness pairs
  safety_pairs: int = 0  # 0: half of preference_pairs
  rlhf_prompts: int = 0  # prompts for rejection sampling and PPO; 0: a third of preference_pairs
  # Held-out sets, of each track (pairs) and for RLHF (prompts). Each file's rows come from one
  # random stream of its own, so a larger set keeps a smaller one as its first rows.
  preference_eval_pairs: int = 300
  eval_prompts: int = 200
  gatt_dialogues: int = 600
  gatt_eval_dialogues: int = 48  # of each split: in-distribution and held-out instructions
  gatt_eval_turns: int = 20  # the paper's horizon (LLAMA2.md §5)

  @classmethod
  def preset(cls, size: str, seed: int = 0) -> WorldConfig:
    sizes = {"test": dict(people=16, towns=4, train_documents=1500, eval_documents=150,
                          sft_dialogues=800, gatt_dialogues=240, gatt_eval_dialogues=32,
                          gatt_eval_turns=8,
                          # The helpfulness RM learns to tell an answer about the person asked
                          # from one about someone else; on 800 pairs it did so for held-out
                          # people on 0.72 of a world's clearly-better test pairs, on 1,600 0.81.
                          preference_pairs=1600, safety_pairs=400, rlhf_prompts=266,
                          # Larger than its training sets warrant: the test chain's learning
                          # thresholds are read off them (~100 clearly-better pairs a track,
                          # ~58 adversarial prompts).
                          preference_eval_pairs=320, eval_prompts=192),
             "tiny": {}, "small": dict(people=200, towns=20, train_documents=40000)}
    if size not in sizes:
      raise ValueError(f"unknown world size {size!r}; choose one of {sorted(sizes)}")
    return cls(seed=seed, **sizes[size])


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  town: str
  pet: str
  color: str
  age: int
  trade: str


@dataclasses.dataclass(frozen=True)
class World:
  people: tuple[Person, ...]
  towns: tuple[str, ...]


def _name(rng: random.Random, used: set[str], syllables: int) -> str:
  while True:
    name = "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
    if name not in used:
      used.add(name)
      return name


def make_world(cfg: WorldConfig) -> World:
  rng = random.Random(cfg.seed)
  used: set[str] = set()
  towns = tuple(_name(rng, used, 3) for _ in range(cfg.towns))
  people = tuple(
      Person(name=_name(rng, used, 2), town=rng.choice(towns), pet=rng.choice(PETS),
             color=rng.choice(COLORS), age=rng.randint(18, 80), trade=rng.choice(TRADES))
      for _ in range(cfg.people))
  return World(people=people, towns=towns)


def fact_sentences(p: Person, rng: random.Random) -> list[str]:
  """Every fact about a person, each in one of a few phrasings."""
  return [
      rng.choice([f"{p.name} lives in {p.town}.", f"{p.name} has a home in {p.town}."]),
      rng.choice([f"{p.name} keeps a {p.pet}.", f"The pet of {p.name} is a {p.pet}."]),
      rng.choice([f"The favourite colour of {p.name} is {p.color}.",
                  f"{p.name} likes the colour {p.color}."]),
      rng.choice([f"{p.name} is {p.age} years old.", f"The age of {p.name} is {p.age}."]),
      rng.choice([f"{p.name} works as a {p.trade}.", f"By trade, {p.name} is a {p.trade}."]),
  ]


def _facts_document(world: World, rng: random.Random) -> str:
  person = rng.choice(world.people)
  sentences = fact_sentences(person, rng)
  rng.shuffle(sentences)
  return " ".join(sentences[:rng.randint(2, 5)])


def _arithmetic_document(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(3, 6)):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
      lines.append(f"{a} + {b} = {a + b}.")
    else:
      a, b = max(a, b), min(a, b)
      lines.append(f"{a} - {b} = {a - b}.")
  return " ".join(lines)


def _story_document(world: World, rng: random.Random) -> str:
  a, b = rng.sample(world.people, 2)
  return (f"One morning {a.name} walked from {a.town} to {b.town} with a {a.pet}. "
          f"There {a.name} met {b.name}, a {b.trade} who keeps a {b.pet}. "
          f"{b.name} showed {a.name} a {b.color} door, and {a.name} went home to {a.town}.")


def _transcript_document(world: World, rng: random.Random) -> str:
  # Dialogue as prose: the chat format and answering on request are left for SFT.
  p = rng.choice(world.people)
  asker = rng.choice(world.people).name
  return (f"{asker} asked where {p.name} lives, and was told that {p.name} lives in {p.town}. "
          f"{asker} then asked about the pet, and heard that {p.name} keeps a {p.pet}.")


def pretraining_documents(world: World, count: int, seed: int) -> list[str]:
  """`count` documents: half facts, and arithmetic, stories and transcripts in equal parts."""
  rng = random.Random(seed)
  documents = []
  for _ in range(count):
    kind = rng.random()
    if kind < 0.5:
      documents.append(_facts_document(world, rng))
    elif kind < 0.67:
      documents.append(_arithmetic_document(rng))
    elif kind < 0.84:
      documents.append(_story_document(world, rng))
    else:
      documents.append(_transcript_document(world, rng))
  return documents


# Questions with one right answer each: (question, attribute). Held-out people are never asked
# about in SFT training, so answer accuracy measures recall of pretrained facts in chat form.
QUESTIONS = (
    ("Where does {name} live?", "town", "{name} lives in {value}."),
    ("What pet does {name} keep?", "pet", "{name} keeps a {value}."),
    ("What is the favourite colour of {name}?", "color", "The favourite colour of {name} is {value}."),
    ("How old is {name}?", "age", "{name} is {value} years old."),
    ("What does {name} do for a living?", "trade", "{name} works as a {value}."),
)
# Generic system prompts; SFT also uses the GAtt families' instructions, but only where they apply
# to one answer (appended to a user turn, or as the system prompt of a single-turn dialogue), so
# keeping an instruction across turns is left for GAtt to teach.
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and correctly.")
INSTRUCTED_TURNS = 0.5  # share of SFT user turns carrying an instruction for that answer only
HOBBY_TURNS = 0.2  # share of SFT user turns asking what the assistant enjoys
# Turns that only ask the assistant to use a name, drawn from everyone in the world. Without
# them SFT's answers name only the people it trains on, and asked about anyone else the tiny
# SFT model answered about one of those instead ("Where does Raul live?" -> "Suti lives in
# Lurida."): the name's one piece had become unlikely after [/INST]. No fact is in these turns.
NAME_TURNS = 0.1
NAME_TASKS = (
    ("Please greet {name}.", "Hello, {name}! It is good to meet you."),
    ("My friend is called {name}. What is my friend called?", "Your friend is called {name}."),
    ("Say the name {name} back to me.", "{name}."),
    ("Write a short note to {name}.", "Dear {name}, I hope you are well."),
)


def question_answer(person: Person, index: int) -> tuple[str, str, str]:
  """(question, answer sentence, the bare value) for one of the QUESTIONS."""
  template, attribute, answer = QUESTIONS[index]
  value = str(getattr(person, attribute))
  return (template.format(name=person.name), answer.format(name=person.name, value=value), value)


def sft_people(world: World) -> tuple[list[Person], list[Person]]:
  """(people SFT trains on, held-out people its evaluation asks about): a 3:1 split."""
  people = list(world.people)
  return [p for i, p in enumerate(people) if i % 4], [p for i, p in enumerate(people) if not i % 4]


def world_turn(people: list[Person], rng: random.Random, hobby_share: float = HOBBY_TURNS
               ) -> tuple[str, str]:
  """One (question, plain correct answer): a question about a person, or what the assistant
  enjoys."""
  if rng.random() < hobby_share:
    return rng.choice(instructions.HOBBY_QUESTIONS), instructions.DEFAULT_HOBBY_ANSWER
  question, answer, _ = question_answer(rng.choice(people), rng.randrange(len(QUESTIONS)))
  return question, answer


def name_turn(names: Sequence[str], rng: random.Random) -> tuple[str, str]:
  """One (question, answer) that uses a name and states nothing about its person."""
  question, answer = rng.choice(NAME_TASKS)
  name = rng.choice(names)
  return question.format(name=name), answer.format(name=name)


def sft_dialogues(world: World, count: int, seed: int, people: list[Person],
                  name_share: float = 0.0) -> list[dict]:
  """Chat dialogues of 1-4 turns about `people`: {"messages": [{"role", "content"}, ...]}.

  A `name_share` of the turns only use the name of someone in the world (`name_turn`).

  Some turns carry an instruction from the GAtt families that the answer obeys; it holds for that
  answer only (the next turn is answered plainly), so SFT teaches following an instruction in
  the current turn and not keeping one.
  """
  rng = random.Random(seed)
  names = [p.name for p in world.people]
  # SFT sees GAtt's held-out values too: following one within a turn is SFT's to teach, keeping
  # one across turns is GAtt's, measured on values GAtt never trained on.
  bank = instructions.default_bank() + instructions.held_out_bank()
  dialogues = []
  for _ in range(count):
    turns = rng.choice((1, 1, 2, 3, 4))
    messages = []
    if turns == 1 and rng.random() < 0.3:
      question, answer = world_turn(people, rng)
      if rng.random() < 0.5:
        system = rng.choice(SYSTEM_PROMPTS)
      else:
        instruction = instructions.random_instruction(bank, rng)
        system, answer = instruction.text, instruction.apply(question, answer)
      messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
                  {"role": "assistant", "content": answer}]
      dialogues.append({"messages": messages})
      continue
    for _ in range(turns):
      if name_share and rng.random() < name_share:
        question, answer = name_turn(names, rng)
      else:
        question, answer = world_turn(people, rng)
      if rng.random() < INSTRUCTED_TURNS:
        instruction = instructions.random_instruction(bank, rng)
        if instructions.is_hobby_question(question):
          # A hobby only shows when asked about: such turns always carry one, so there are
          # enough of them to learn from.
          instruction = instructions.with_hobby(instruction, bank, rng)
        question, answer = f"{question} {instruction.text}", instruction.apply(question, answer)
      messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    dialogues.append({"messages": messages})
  return dialogues


def qa_eval_set(people: list[Person]) -> list[dict]:
  """Every question about `people`, with the value a correct answer contains."""
  rows = []
  for person in people:
    for index in range(len(QUESTIONS)):
      question, _, value = question_answer(person, index)
      rows.append({"question": question, "answer": value})
  return rows


def fact_probes(world: World) -> list[dict]:
  """Completions with one right answer: "Mira lives in" -> "Velloran"."""
  probes = []
  for p in world.people:
    probes.append({"prompt": f"{p.name} lives in", "answer": p.town})
    probes.append({"prompt": f"{p.name} keeps a", "answer": p.pet})
  return probes


def write_jsonl(path: str, rows: list[dict]) -> None:
  """Writes `rows` one JSON object a line, through a temporary file so a reader never sees half a
  file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
