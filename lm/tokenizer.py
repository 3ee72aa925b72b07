"""SentencePiece tokenizer and the exact Llama 2 chat format (LLAMA2.md §2).

`Tokenizer` wraps any SentencePiece model (Meta's `tokenizer.model` included); `train_tokenizer`
trains one with the Llama 2 trainer settings. `encode_dialog` builds the chat format token by
token as Meta's `generation.py::chat_completion` does: the system prompt merged into the first
user turn, every completed (user, assistant) pair its own `[BOS] [INST] u [/INST] a [EOS]`
encode call with one space before EOS, and the final user turn left open for the model.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
CONTROL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")


class DialogError(ValueError):
  """A dialog that the Llama 2 chat format cannot express; `kind` names the class of fault (data
  readers count skipped rows by it)."""

  def __init__(self, message: str, kind: str = "invalid dialog"):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass(frozen=True)
class EncodedDialog:
  """tokens [T] int32; loss_mask [T] (1 on assistant tokens and their EOS); turn [T] (the index of
  the (user, assistant) pair each token belongs to, 0-based)."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  turn: np.ndarray


class Tokenizer:
  """A SentencePiece model with Llama 2's conventions: BOS 1, EOS 2, no pad token."""

  def __init__(self, model_path: str | os.PathLike):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer model {model_path} does not exist")
    self.path = os.fspath(model_path)
    self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    self.vocab_size = self.sp.vocab_size()

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Meta's `Tokenizer.encode`: [BOS]? + pieces + [EOS]?"""
    return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

  def decode(self, tokens: Sequence[int]) -> str:
    return self.sp.decode([int(t) for t in tokens])

  def encode_dialog(self, messages: Sequence[dict]) -> EncodedDialog:
    """Token ids, loss mask and turn index of a dialog in the Llama 2 chat format.

    Args:
      messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]: an optional
        system message, then user and assistant alternating, starting with user. Ending with an
        assistant turn gives a complete training example; ending with a user turn gives a prompt.

    Raises:
      DialogError: roles out of order, an unknown role, empty content, or a control tag
        ([INST], <<SYS>>, ...) inside a message (Meta's code refuses these too).
    """
    turns = check_dialog(messages)
    tokens, mask, turn_index = [], [], []
    for index, (user, assistant) in enumerate(turns):
      if assistant is None:
        piece = self.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True)
        tokens += piece
        mask += [0] * len(piece)
      else:
        # The prompt part and the answer part are one encode call in Meta's code; encoding the
        # whole string and locating the answer keeps the exact same pieces.
        prompt = f"{B_INST} {user.strip()} {E_INST}"
        whole = self.encode(f"{prompt} {assistant.strip()} ", bos=True, eos=True)
        prompt_len = _shared_prefix(whole, self.encode(prompt, bos=True))
        tokens += whole
        mask += [0] * prompt_len + [1] * (len(whole) - prompt_len)
      turn_index += [index] * (len(tokens) - len(turn_index))
    return EncodedDialog(np.asarray(tokens, np.int32), np.asarray(mask, np.int32),
                         np.asarray(turn_index, np.int32))


def _shared_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def check_dialog(messages: Sequence[dict]) -> list[tuple[str, str | None]]:
  """Validates a dialog and merges the system prompt: -> [(user, assistant or None), ...]."""
  if not messages:
    raise DialogError("a dialog needs at least one user message", "missing field")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
      raise DialogError(f"message {i}: needs 'role' and 'content', got {message!r:.80}",
                        "missing field")
    if message["role"] not in ROLES:
      raise DialogError(f"message {i}: unknown role {message['role']!r}; roles are {ROLES}",
                        "unknown role")
    if not isinstance(message["content"], str) or not message["content"].strip():
      raise DialogError(f"message {i} ({message['role']}): empty content", "empty text")
    tags = [tag for tag in CONTROL_TAGS if tag in message["content"]]
    if tags:
      raise DialogError(f"message {i} ({message['role']}): contains control tag(s) {tags}",
                        "control tag")
  messages = list(messages)
  if messages[0]["role"] == "system":
    if len(messages) < 2:
      raise DialogError("a system message must be followed by a user message",
                        "roles out of order")
    merged = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
    messages = [{"role": messages[1]["role"], "content": merged}] + messages[2:]
  for i, message in enumerate(messages):
    expected = "user" if i % 2 == 0 else "assistant"
    if message["role"] != expected:
      raise DialogError(f"roles must alternate user/assistant after the optional system message; "
                        f"turn {i} is {message['role']!r}, expected {expected!r}", "roles out of order")
  users = [m["content"] for m in messages[0::2]]
  answers = [m["content"] for m in messages[1::2]] + [None]
  return list(zip(users, answers[:len(users)]))


# LLAMA2.md §2.1, the trainer_spec of Meta's tokenizer.model (vocab size is the caller's).
LLAMA2_TRAINER_SPEC = dict(
    model_type="bpe", split_digits=True, byte_fallback=True, split_by_unicode_script=True,
    split_by_whitespace=True, split_by_number=True, allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16, character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2,
    pad_id=-1, normalization_rule_name="identity", add_dummy_prefix=True,
    remove_extra_whitespaces=False,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_path: str | os.PathLike,
                    *, input_sentence_size: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000,
                    num_threads: int = 2) -> Tokenizer:
  """Trains a SentencePiece BPE model with Llama 2's settings on `texts` (one line each).

  The model is written atomically to `output_path`.
  """
  output_path = os.fspath(output_path)
  directory = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      for text in texts:
        for line in text.splitlines():
          if line.strip():
            f.write(line + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(tmp, "m"), vocab_size=vocab_size,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size, num_threads=num_threads,
        minloglevel=2, **LLAMA2_TRAINER_SPEC)
    os.replace(os.path.join(tmp, "m.model"), output_path)
  return Tokenizer(output_path)
