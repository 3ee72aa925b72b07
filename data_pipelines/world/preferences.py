"""The miniature world's preference data and RLHF prompts (LLAMA2.md §6.1, §7, §8).

Every answer has a graded quality, and a pair's rating is how far apart its two answers are:

  helpfulness kinds (quality): complete, the whole right sentence (4); terse, the bare right
  value (3.6); near, a number off by one or the right answer with a false extra fact (3);
  wrong, the right shape with a wrong value (2); off_topic, about someone or something else, or
  garbled (0).
  safety kinds (safety.response): template (4), template_short (3.6), bare refusal (3),
  hedged (1), partial (0.5) and full (0) compliance; the first three are safe.

  gap >= 3.5: significantly better; >= 1.5: better; >= 0.6: slightly better; else negligibly
  better or unsure.

Safety pairs follow the paper's bins (18 % safe chosen over unsafe, 47 % both safe, 35 % both
unsafe); unsafe-chosen-over-safe pairs are never made. Rows carry `chosen_kind` / `rejected_kind`
for analysis (readers ignore them).

Prompts for rejection sampling and PPO: helpful questions with a ground-truth `answer` (the
world's questions and small sums; `score_answer` checks a reply) and adversarial prompts tagged
`is_safety` with their `category` (safety.score_safety checks a reply).
"""

from __future__ import annotations

import os
import random

from data_pipelines.preferences import RATINGS
from data_pipelines.world import core
from data_pipelines.world import safety

HELPFUL_QUALITY = {"complete": 4.0, "terse": 3.6, "near": 3.0, "wrong": 2.0, "off_topic": 0.0}
SAFETY_QUALITY = {"template": 4.0, "template_short": 3.6, "bare": 3.0, "hedged": 1.0,
                  "partial": 0.5, "comply": 0.0}
_ATTRIBUTES = ("town", "pet", "color", "age", "trade")


def rating_for(gap: float) -> str:
  """The rating of a pair whose answers differ in quality by `gap` (> 0)."""
  if gap >= 3.5:
    return RATINGS[0]
  if gap >= 1.5:
    return RATINGS[1]
  if gap >= 0.6:
    return RATINGS[2]
  return RATINGS[3]


def is_eval_sum(a: int, b: int) -> bool:
  """One sum in five is kept for test sets, so a test sum is never a training one."""
  return (a * 21 + b) % 5 == 0


def helpful_question(world: core.World, people, rng: random.Random, split: str = "train") -> dict:
  """{"prompt", "answer" (the value a right reply contains), "person", "attribute"}: a question
  about a person, or a small sum (attribute "sum") from the split's share of sums."""
  if rng.random() < 0.2:
    while True:
      a, b = rng.randint(0, 20), rng.randint(0, 20)
      if is_eval_sum(a, b) == (split == "eval"):
        break
    return {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "person": "", "attribute": "sum"}
  person = rng.choice(people)
  index = rng.randrange(len(core.QUESTIONS))
  question, _, value = core.question_answer(person, index)
  return {"prompt": question, "answer": value, "person": person.name,
          "attribute": core.QUESTIONS[index][1]}


def _other(values, right: str, rng: random.Random) -> str:
  return rng.choice([v for v in values if str(v) != right])


def helpful_answer(kind: str, question: dict, world: core.World, rng: random.Random) -> str:
  """A reply of one graded kind (see the module docstring) to a helpful_question."""
  if question["attribute"] == "sum":
    total = int(question["answer"])
    a, b = question["prompt"][len("What is "):-1].split(" + ")
    wrong = _other(range(0, 41), str(total), rng)
    return {"complete": f"{a} + {b} = {total}.", "terse": f"{total}.",
            "near": f"{a} + {b} = {total + rng.choice((-1, 1)) if total else 1}.",
            "wrong": f"{a} + {b} = {wrong}.",
            "off_topic": f"{_person_sentence(world, rng)}"}[kind]
  person = next(p for p in world.people if p.name == question["person"])
  index = _ATTRIBUTES.index(question["attribute"])
  _, sentence, value = core.question_answer(person, index)
  template = core.QUESTIONS[index][2]
  if kind == "complete":
    return sentence
  if kind == "terse":
    return f"{value}."
  if kind == "near":
    if question["attribute"] == "age":
      return template.format(name=person.name, value=person.age + rng.choice((-1, 1)))
    extra = rng.choice([i for i in range(len(_ATTRIBUTES)) if i != index])
    values = _values(world, _ATTRIBUTES[extra])
    false = _other(values, str(getattr(person, _ATTRIBUTES[extra])), rng)
    return sentence + " " + core.QUESTIONS[extra][2].format(name=person.name, value=false)
  if kind == "wrong":
    return template.format(name=person.name, value=_other(_values(world, question["attribute"]),
                                                         value, rng))
  other = _person_sentence(world, rng, exclude=person.name)
  if rng.random() < 0.5:  # garbled: the words of an unrelated sentence, shuffled
    words = other.rstrip(".").split()
    rng.shuffle(words)
    return " ".join(words).lower() + "."
  return other


def _values(world: core.World, attribute: str) -> list:
  values = {str(getattr(p, attribute)) for p in world.people}
  if attribute == "town":
    values |= set(world.towns)
  return sorted(values)


def _person_sentence(world, rng, exclude: str = "") -> str:
  other = rng.choice([p for p in world.people if p.name != exclude])
  return core.question_answer(other, rng.randrange(len(core.QUESTIONS)))[1]


def helpfulness_pairs(world: core.World, people, count: int, seed: int, split: str = "train"
                      ) -> list[dict]:
  """Helpfulness preference pairs over questions about `people` and the split's small sums."""
  rng = random.Random(seed)
  pairs = []
  while len(pairs) < count:
    question = helpful_question(world, people, rng, split)
    chosen_kind = "complete" if rng.random() < 0.75 else "terse"
    rejected_kind = rng.choice([k for k, q in HELPFUL_QUALITY.items()
                                if q < HELPFUL_QUALITY[chosen_kind]])
    chosen = helpful_answer(chosen_kind, question, world, rng)
    rejected = helpful_answer(rejected_kind, question, world, rng)
    if chosen == rejected:
      continue
    gap = HELPFUL_QUALITY[chosen_kind] - HELPFUL_QUALITY[rejected_kind]
    pairs.append({"prompt": question["prompt"], "chosen": chosen, "rejected": rejected,
                  "rating": rating_for(gap), "is_safety": False, "chosen_kind": chosen_kind,
                  "rejected_kind": rejected_kind})
  return pairs


# The paper's safety bins: (share, kinds the chosen answer may take, kinds the rejected may take).
_SAFE, _UNSAFE = ("template", "template_short", "bare"), ("hedged", "partial", "comply")
SAFETY_BINS = ((0.18, _SAFE, _UNSAFE), (0.47, _SAFE, _SAFE), (0.35, _UNSAFE, _UNSAFE))


def safety_pairs(people, count: int, seed: int) -> list[dict]:
  """Safety preference pairs over adversarial prompts about `people`, with safe/unsafe labels."""
  rng = random.Random(seed)
  by_name = {p.name: p for p in people}
  pairs = []
  while len(pairs) < count:
    prompt = safety.adversarial_prompt(people, rng)
    draw, bin_ = rng.random(), SAFETY_BINS[-1]
    for share, *kinds in SAFETY_BINS:
      if draw < share:
        bin_ = (share, *kinds)
        break
      draw -= share
    if bin_[1] == bin_[2]:  # both safe or both unsafe: two different kinds, the better chosen
      kinds = sorted(rng.sample(bin_[1], 2), key=SAFETY_QUALITY.get, reverse=True)
    else:
      kinds = [rng.choice(bin_[1]), rng.choice(bin_[2])]
    chosen_kind, rejected_kind = kinds
    gap = SAFETY_QUALITY[chosen_kind] - SAFETY_QUALITY[rejected_kind]
    person = by_name[prompt["person"]]
    chosen = safety.response(chosen_kind, prompt["category"], person, rng)
    rejected = safety.response(rejected_kind, prompt["category"], person, rng)
    if chosen == rejected:
      continue
    pairs.append({"prompt": prompt["prompt"], "chosen": chosen, "rejected": rejected,
                  "rating": rating_for(gap), "is_safety": True,
                  "chosen_safe": chosen_kind in safety.SAFE_KINDS,
                  "rejected_safe": rejected_kind in safety.SAFE_KINDS,
                  "category": prompt["category"], "chosen_kind": chosen_kind,
                  "rejected_kind": rejected_kind})
  return pairs


def rlhf_prompts(world: core.World, people, count: int, seed: int,
                 safety_share: float = 0.3, split: str = "train") -> list[dict]:
  """Prompts for rejection sampling and PPO: helpful ones with an answer, adversarial ones tagged
  is_safety with a category. {"prompt", "is_safety", "category", "answer"}."""
  rng = random.Random(seed)
  prompts = []
  for _ in range(count):
    if rng.random() < safety_share:
      p = safety.adversarial_prompt(people, rng)
      prompts.append({"prompt": p["prompt"], "is_safety": True, "category": p["category"],
                      "answer": ""})
    else:
      q = helpful_question(world, people, rng, split)
      prompts.append({"prompt": q["prompt"], "is_safety": False, "category": "",
                      "answer": q["answer"]})
  return prompts


def score_answer(reply: str, answer: str) -> bool:
  """Whether a reply states the ground-truth value (a whole word, case-insensitive)."""
  words = reply.lower().replace(".", " ").replace(",", " ").replace("?", " ").split()
  return answer.lower() in words


def write(out: str, world: core.World, cfg: core.WorldConfig) -> dict:
  """Writes preferences/{helpful,safety}/{train,eval}.jsonl and prompts/{train,eval}.jsonl.

  Test pairs and eval prompts are about people (and sums) no training pair mentions: the SFT
  split's held-out people, whom only pretraining describes."""
  people, held_out = core.sft_people(world)
  base, n, n_eval = cfg.seed * 1000, cfg.preference_pairs, cfg.preference_eval_pairs
  files = {
      "preferences/helpful/train.jsonl": helpfulness_pairs(world, people, n, base + 10),
      "preferences/helpful/eval.jsonl": helpfulness_pairs(world, held_out, n_eval, base + 11,
                                                          "eval"),
      "preferences/safety/train.jsonl": safety_pairs(people, cfg.safety_pairs or n // 2,
                                                     base + 12),
      "preferences/safety/eval.jsonl": safety_pairs(held_out, n_eval, base + 13),
      "prompts/train.jsonl": rlhf_prompts(world, people, cfg.rlhf_prompts or n // 3, base + 14),
      "prompts/eval.jsonl": rlhf_prompts(world, held_out, cfg.eval_prompts, base + 15,
                                         split="eval"),
  }
  for path, rows in files.items():
    core.write_jsonl(os.path.join(out, path), rows)
  return {path.replace("/", "_").removesuffix(".jsonl"): len(rows) for path, rows in files.items()}
