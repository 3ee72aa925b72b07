"""Instructions that must hold for a whole dialogue, each with an automatic checker (GAtt data).

LLAMA2.md §5 builds Ghost Attention data from synthetic constraint families (hobbies, a language,
a public figure), randomly combined, rewritten tersely half the time. The miniature world uses
families of the same kinds whose obedience a few lines of code can check:

  style     "Always answer in capital letters."      terse "Style: capitals."
  opening   "Always start your answer with Indeed."  terse "Opening: Indeed."
  closing   "Always end your answer with Farewell."  terse "Closing: Farewell."
  persona   "Always act as Captain Vo and sign..."   terse "Figure: Captain Vo."
  hobby     "You enjoy chess."                       terse "Hobby: chess."
  language  "Always answer in Zemlic."               terse "Language: Zemlic."

Zemlic is the world's made-up second language: a word-for-word cipher of the words the world's
answers are made of (names, towns, numbers and other values stay as they are), so a checker can
tell it by vocabulary: a reply obeys when it uses Zemlic words and none of the English words they
stand for.

Each family's values are split in two: `default_bank()` (GAtt samples and trains on these) and
`held_out_bank()` (new personas, hobbies, openings and closings that GAtt never sees; SFT uses
both inline, so the model can follow them within one turn). Adherence on held-out values measures
whether GAtt taught keeping *an* instruction rather than the values its sample filter selected.

A `Constraint` knows its text, how to rewrite a plain answer so it obeys (to write SFT data with
correct answers), and how to check a reply. A checker returns None when the turn does not test the
constraint (a hobby is only visible when the user asks what the assistant enjoys).

An instruction bank is JSONL, one constraint per line: {"family", "value"} with optional "text"
and "terse" overriding the default phrasings. A family without a checker is refused with the
file and line, before any compute.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Sequence

from data_pipelines.text import DataError, jsonl_rows

STYLES = ("capitals", "lower case")
# Three or four values a family: enough that following means reading the instruction, few
# enough for a model of a few million parameters to bind each value in minutes of training.
OPENINGS = ("Indeed", "Well", "Listen")
CLOSINGS = ("Farewell.", "Cheers.", "Good day.")
PERSONAS = ("Captain Vo", "Doctor Yun", "Queen Hesh")
HOBBIES = ("fishing", "chess", "singing", "tennis")
LANGUAGES = ("Zemlic",)
# Values GAtt never trains on (see the module docstring).
HELD_OUT_OPENINGS = ("Surely",)
HELD_OUT_CLOSINGS = ("Be well.",)
HELD_OUT_PERSONAS = ("Sister Ama", "Baron Kell")
HELD_OUT_HOBBIES = ("rowing", "painting")

# English word -> Zemlic word, for every word of the world's answer templates.
ZEMLIC = {
    "lives": "dorva", "in": "ek", "keeps": "mahu", "a": "u", "the": "lo", "favourite": "bressa",
    "colour": "tinko", "of": "ri", "is": "sa", "years": "jarin", "old": "vetu", "works": "fendo",
    "as": "ko", "i": "mi", "enjoy": "lupa", "answering": "respen", "questions": "kwesti",
}
_ZEMLIC_WORDS = frozenset(ZEMLIC.values())

HOBBY_QUESTIONS = ("What do you enjoy doing?", "What is your hobby?", "What do you like to do?")
DEFAULT_HOBBY_ANSWER = "I enjoy answering questions."

# Families that act on the same part of a reply cannot be combined (a reply has one ending).
# A language rewrites every word, so it excludes the styles rather than stacking on them.
GROUPS = {"style": "style", "language": "style", "opening": "opening", "closing": "ending",
          "persona": "ending", "hobby": "hobby"}


def is_hobby_question(question: str) -> bool:
  return question.strip() in HOBBY_QUESTIONS


def _words(text: str) -> list[str]:
  return re.findall(r"[a-z]+", text.lower())


def translate(reply: str, language: str = "Zemlic") -> str:
  """The reply word for word in `language`; words outside its table (names, values) are kept."""
  del language  # one made-up language so far; the argument names which
  def word(match):
    english = match.group(0)
    foreign = ZEMLIC.get(english.lower())
    if foreign is None:
      return english
    return foreign.capitalize() if english[0].isupper() else foreign
  return re.sub(r"[A-Za-z]+", word, reply)


def _has_letters(text: str) -> bool:
  return any(c.isalpha() for c in text)


def _plain(reply: str) -> str:
  return reply.strip().lower()


@dataclasses.dataclass(frozen=True)
class Constraint:
  """One rule from a family, e.g. Constraint("persona", "Captain Vo")."""

  family: str
  value: str
  text: str = ""   # the full phrasing; empty: the family's default
  terse: str = ""  # the short phrasing; empty: the family's default

  def __post_init__(self):
    if self.family not in CHECKERS:
      raise ValueError(f"instruction family {self.family!r} has no checker; families with "
                       f"checkers: {sorted(CHECKERS)}")
    if self.family == "style" and self.value not in STYLES:
      raise ValueError(f"style {self.value!r} has no checker; styles: {STYLES}")
    if self.family == "language" and self.value not in LANGUAGES:
      raise ValueError(f"language {self.value!r} has no word list; languages: {LANGUAGES}")
    if not str(self.value).strip():
      raise ValueError(f"instruction family {self.family!r} needs a non-empty value")

  def phrase(self, terse: bool) -> str:
    if terse:
      return self.terse or _TERSE[self.family].format(value=self.value)
    return self.text or _FULL[self.family].format(value=self.value)

  def check(self, question: str, reply: str) -> bool | None:
    """Whether `reply` (to `question`) obeys; None when this turn does not test it."""
    return CHECKERS[self.family](self.value, question, reply)

  def to_json(self) -> dict:
    row = {"family": self.family, "value": self.value}
    row.update({k: v for k, v in (("text", self.text), ("terse", self.terse)) if v})
    return row


_FULL = {
    "style": "Always answer in {value}.",
    "opening": "Always start your answer with {value}.",
    "closing": "Always end your answer with {value}",
    "persona": "Always act as {value} and sign your answers.",
    "hobby": "You enjoy {value}.",
    "language": "Always answer in {value}.",
}
_TERSE = {"style": "Style: {value}.", "opening": "Opening: {value}.", "closing": "Closing: {value}",
          "persona": "Figure: {value}.", "hobby": "Hobby: {value}.",
          "language": "Language: {value}."}
_FULL_STYLE = {"capitals": "Always answer in capital letters.",
               "lower case": "Always answer in lower case."}


def _check_style(value, question, reply):
  if not _has_letters(reply):
    return False
  return reply == reply.upper() if value == "capitals" else reply == reply.lower()


def _check_opening(value, question, reply):
  return _plain(reply).startswith(value.lower())


def _check_closing(value, question, reply):
  return _plain(reply).endswith(value.lower())


def _check_persona(value, question, reply):
  return _plain(reply).endswith(f"- {value}".lower())


def _check_hobby(value, question, reply):
  if not is_hobby_question(question):
    return None
  return value.lower() in _plain(reply)


def _check_language(value, question, reply):
  words = set(_words(reply))
  return bool(words & _ZEMLIC_WORDS) and not words & ZEMLIC.keys()


CHECKERS = {"style": _check_style, "opening": _check_opening, "closing": _check_closing,
            "persona": _check_persona, "hobby": _check_hobby, "language": _check_language}


@dataclasses.dataclass(frozen=True)
class Instruction:
  """A random combination of constraints from different groups, phrased fully or tersely."""

  constraints: tuple[Constraint, ...]
  terse: bool = False

  @property
  def text(self) -> str:
    return " ".join(c.phrase(self.terse) for c in self.constraints)

  def check(self, question: str, reply: str) -> bool | None:
    """True when every constraint this turn tests holds; None when the turn tests none."""
    results = [c.check(question, reply) for c in self.constraints]
    tested = [r for r in results if r is not None]
    return all(tested) if tested else None

  def apply(self, question: str, reply: str) -> str:
    """Rewrites a plain correct answer so that it obeys every constraint."""
    families = {c.family: c.value for c in self.constraints}
    if "hobby" in families and is_hobby_question(question):
      reply = f"I enjoy {families['hobby']}."
    if "language" in families:
      reply = translate(reply, families["language"])
    if "opening" in families:
      reply = f"{families['opening']}, {reply}"
    if "closing" in families:
      reply = f"{reply} {families['closing']}"
    if "persona" in families:
      reply = f"{reply} - {families['persona']}"
    if families.get("style") == "capitals":
      reply = reply.upper()
    elif families.get("style") == "lower case":
      reply = reply.lower()
    return reply

  def to_json(self) -> dict:
    return {"constraints": [c.to_json() for c in self.constraints], "terse": self.terse}

  @classmethod
  def from_json(cls, row: dict) -> Instruction:
    return cls(tuple(Constraint(**c) for c in row["constraints"]), bool(row.get("terse", False)))


def default_bank() -> list[Constraint]:
  """The constraints GAtt trains on: every family of the miniature world."""
  bank = [Constraint("style", s, text=_FULL_STYLE[s]) for s in STYLES]
  bank += [Constraint("language", v) for v in LANGUAGES]
  bank += [Constraint("opening", w) for w in OPENINGS]
  bank += [Constraint("closing", p) for p in CLOSINGS]
  bank += [Constraint("persona", p) for p in PERSONAS]
  bank += [Constraint("hobby", h) for h in HOBBIES]
  return bank


def held_out_bank() -> list[Constraint]:
  """Values GAtt never trains on: new openings, closings, personas and hobbies."""
  bank = [Constraint("opening", w) for w in HELD_OUT_OPENINGS]
  bank += [Constraint("closing", p) for p in HELD_OUT_CLOSINGS]
  bank += [Constraint("persona", p) for p in HELD_OUT_PERSONAS]
  bank += [Constraint("hobby", h) for h in HELD_OUT_HOBBIES]
  return bank


def random_instruction(bank: Sequence[Constraint], rng: random.Random, max_constraints: int = 2,
                       terse_fraction: float = 0.5) -> Instruction:
  """1..max_constraints constraints from distinct groups; terse with probability terse_fraction."""
  by_group: dict[str, list[Constraint]] = {}
  for constraint in bank:
    by_group.setdefault(GROUPS[constraint.family], []).append(constraint)
  groups = sorted(by_group)
  count = rng.randint(1, min(max_constraints, len(groups)))
  chosen = rng.sample(groups, count)
  constraints = tuple(rng.choice(by_group[g]) for g in sorted(chosen, key=groups.index))
  return Instruction(constraints, terse=rng.random() < terse_fraction)


def with_hobby(instruction: Instruction, bank: Sequence[Constraint], rng: random.Random
               ) -> Instruction:
  """The instruction with a hobby from the bank added (or kept, if it has one)."""
  if any(c.family == "hobby" for c in instruction.constraints):
    return instruction
  hobbies = [c for c in bank if c.family == "hobby"]
  if not hobbies:
    return instruction
  return Instruction(instruction.constraints + (rng.choice(hobbies),), instruction.terse)


def read_bank(path: str) -> list[Constraint]:
  """Constraints from a JSONL bank; an unknown family or a bad row fails with file:line."""
  bank = []
  for where, row in jsonl_rows(path):
    if not isinstance(row, dict) or "family" not in row or "value" not in row:
      raise DataError(f"{where}: an instruction needs 'family' and 'value'")
    unknown = set(row) - {"family", "value", "text", "terse"}
    if unknown:
      raise DataError(f"{where}: unknown instruction field(s) {sorted(unknown)}")
    try:
      bank.append(Constraint(**{k: str(v) for k, v in row.items()}))
    except ValueError as e:
      raise DataError(f"{where}: {e}") from e
  if not bank:
    raise DataError(f"{path}: the instruction bank is empty")
  return bank
