"""The miniature world's Ghost Attention data: multi-turn dialogues, the instruction bank, and
the adherence evaluation set (LLAMA2.md §5, Table 30's shape).

  DIR/gatt/instructions.jsonl   the bank: one constraint per line (data_pipelines/instructions.py)
  DIR/gatt/dialogues.jsonl      multi-turn dialogues ({"messages": ...}) whose user turns GAtt
                                re-asks with an instruction; their answers are plain and correct
  DIR/gatt/eval.jsonl           {"instruction": {...}, "questions": [N user turns], "split"}: a
                                system instruction and the questions of an N-turn conversation;
                                split "in_distribution" draws from the bank GAtt trains on,
                                "held_out" has at least one value GAtt never sees
                                (instructions.held_out_bank())

The dialogues are longer than SFT's (up to `max_turns`) and ask what the assistant enjoys more
often, so that every family is tested at many turns.
"""

from __future__ import annotations

import random

from data_pipelines import instructions
from data_pipelines.world.core import Person, World, world_turn

GATT_HOBBY_TURNS = 0.25
EVAL_HOBBY_TURNS = 0.5


def gatt_dialogues(count: int, seed: int, people: list[Person], max_turns: int = 8) -> list[dict]:
  """`count` dialogues of 2..max_turns turns with plain correct answers."""
  rng = random.Random(seed)
  dialogues = []
  for _ in range(count):
    messages = []
    for _ in range(rng.randint(2, max_turns)):
      question, answer = world_turn(people, rng, GATT_HOBBY_TURNS)
      messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    dialogues.append({"messages": messages})
  return dialogues


def _held_out_instruction(rng: random.Random) -> instructions.Instruction:
  """A random instruction with at least one held-out value (a style may join it)."""
  styles = [c for c in instructions.default_bank() if instructions.GROUPS[c.family] == "style"]
  while True:
    instruction = instructions.random_instruction(instructions.held_out_bank() + styles, rng)
    if any(instructions.GROUPS[c.family] != "style" for c in instruction.constraints):
      return instruction


def adherence_eval_set(count: int, seed: int, people: list[Person], turns: int,
                       bank: list[instructions.Constraint], split: str = "in_distribution"
                       ) -> list[dict]:
  """`count` conversations of `turns` questions, each under a random system instruction from
  `bank` (split "in_distribution") or with a held-out value (split "held_out")."""
  rng = random.Random(seed)
  rows = []
  for _ in range(count):
    if split == "held_out":
      instruction = _held_out_instruction(rng)
    else:
      instruction = instructions.random_instruction(bank, rng)
    # A hobby only shows when asked about, so conversations under one ask about it more often.
    hobby = any(c.family == "hobby" for c in instruction.constraints)
    share = EVAL_HOBBY_TURNS if hobby else GATT_HOBBY_TURNS
    questions = [world_turn(people, rng, share)[0] for _ in range(turns)]
    rows.append({"instruction": instruction.to_json(), "questions": questions, "split": split})
  return rows


def gatt_files(world: World, dialogues: int, eval_dialogues: int, eval_turns: int, seed: int
               ) -> dict[str, list[dict]]:
  """The rows of every GAtt file, by path relative to the world's directory; the evaluation set
  has `eval_dialogues` conversations of each split."""
  bank = instructions.default_bank()
  people = list(world.people)
  return {
      "gatt/instructions.jsonl": [c.to_json() for c in bank],
      "gatt/dialogues.jsonl": gatt_dialogues(dialogues, seed, people),
      "gatt/eval.jsonl": (
          adherence_eval_set(eval_dialogues, seed + 1, people, eval_turns, bank)
          + adherence_eval_set(eval_dialogues, seed + 2, people, eval_turns, bank, "held_out")),
  }
