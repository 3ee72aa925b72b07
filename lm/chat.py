"""A multi-turn chat session in the exact Llama 2 format, streaming the model's replies."""

from __future__ import annotations

import sys
from typing import Callable

import jax

from lm import sampling
from lm.tokenizer import Tokenizer


class ChatSession:
  """Keeps the dialog (optional system prompt, then user/assistant turns) and answers new turns.

  Each reply is sampled from the whole history encoded with `Tokenizer.encode_dialog`; when the
  history outgrows the model's context, the oldest exchanges are dropped (the system prompt stays).
  """

  def __init__(self, graphdef, model_cfg, params, tokenizer: Tokenizer, *,
               system: str | None = None, sampling_cfg: sampling.SamplingConfig | None = None,
               seed: int = 0):
    self.graphdef, self.model_cfg, self.params, self.tokenizer = graphdef, model_cfg, params, tokenizer
    self.system = system
    self.cfg = sampling_cfg or sampling.SamplingConfig(eos_id=tokenizer.eos_id)
    self.turns: list[dict] = []
    self.rng = jax.random.key(seed)

  def messages(self, user: str) -> list[dict]:
    system = [{"role": "system", "content": self.system}] if self.system else []
    return system + self.turns + [{"role": "user", "content": user}]

  def prompt(self, user: str) -> list[int]:
    """Token ids of the history plus a new user turn, trimmed to leave room for the reply."""
    budget = self.model_cfg.max_seq_len - self.cfg.max_new_tokens
    while True:
      tokens = self.tokenizer.encode_dialog(self.messages(user)).tokens.tolist()
      if len(tokens) <= budget or not self.turns:
        break
      self.turns = self.turns[2:]
    if len(tokens) > budget:
      raise ValueError(f"the message is {len(tokens)} tokens with the system prompt; the model "
                       f"takes {budget} before its {self.cfg.max_new_tokens}-token reply")
    return tokens

  def reply(self, user: str, on_text: Callable[[str], None] = lambda text: None) -> str:
    """Samples the answer to `user`, calling `on_text` with each new piece of text."""
    self.rng, rng = jax.random.split(self.rng)
    produced: list[int] = []
    shown = ""
    for token in sampling.stream(self.graphdef, self.model_cfg, self.params, self.prompt(user),
                                 rng, self.cfg):
      if token == self.tokenizer.eos_id:
        break
      produced.append(token)
      text = self.tokenizer.decode(produced)
      on_text(text[len(shown):])
      shown = text
    answer = shown.strip()
    self.turns += [{"role": "user", "content": user},
                   {"role": "assistant", "content": answer or "..."}]
    return answer

  def reset(self) -> None:
    self.turns = []


def repl(session: ChatSession, read: Callable[[str], str] = input, out=None) -> None:
  """The interactive loop: /reset clears the history, /exit (or end of input) leaves."""
  out = out or sys.stdout
  while True:
    try:
      line = read("user> ")
    except EOFError:
      return
    command = line.strip()
    if command in ("/exit", "/quit"):
      return
    if command == "/reset":
      session.reset()
      out.write("(history cleared)\n")
      continue
    if not command:
      continue
    out.write("assistant> ")
    session.reply(line, on_text=lambda text: (out.write(text), out.flush()))
    out.write("\n")
