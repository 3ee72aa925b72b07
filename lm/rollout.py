"""The one batched generation path: prompts or multi-turn conversations in; tokens, per-token
logprobs and masks out, under the sharding plan of the role that generates.

Every sampling loop of the project goes through here: GAtt's data and adherence evals, the SFT
and fact evals, `lm sample`, and the RLHF stages. Prompts are sorted by length and cut into
fixed-shape batches: lengths rounded up to a bucket and the last batch padded to full size, so a
whole run compiles a handful of programs. Rows are left-padded (lm/sampling.py) and each stops at
its own EOS. The prompts are placed by the role's plan (`batch` rule) on the role's mesh, so the
same call runs under the training layout or a rollout layout (lm/roles.py `move`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import jax
import numpy as np

from lm import sampling, sharding
from lm.roles import Role
from lm.tokenizer import Tokenizer

# Prompt lengths are padded up to a multiple of this, bounding recompiles.
LENGTH_BUCKET = 64


def padded_length(n: int, multiple: int = LENGTH_BUCKET) -> int:
  """The prompt length a batch whose longest prompt has n tokens is compiled for."""
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Samples:
  """N generations, in the order of the prompts given.

  prompts: N token lists. tokens [N, M] int32 (pad after the end), logprobs [N, M] float32 of
  each sampled token under the model's own temperature-1 distribution (0 after the end),
  mask [N, M] 1.0 on generated tokens (EOS included), finished [N] bool (ended with EOS).
  """

  prompts: list[list[int]]
  tokens: np.ndarray
  logprobs: np.ndarray
  mask: np.ndarray
  finished: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    return self.mask.sum(axis=1).astype(np.int32)

  def answer(self, row: int) -> list[int]:
    """Row's generated tokens without padding (EOS included when it was reached)."""
    return self.tokens[row, :self.lengths[row]].tolist()


def generate(role: Role, prompts: Sequence[Sequence[int]], cfg: sampling.SamplingConfig,
             rng: jax.Array, *, batch_size: int = 64, length_bucket: int = LENGTH_BUCKET,
             log: Callable[[str], None] = lambda text: None) -> Samples:
  """Samples a continuation of every prompt.

  Args:
    role: an `lm`-head role; its mesh and plan place the prompts and the KV cache.
    prompts: N token lists (each at least one token, e.g. BOS).
    cfg: temperature (0: greedy), top-p/top-k, max_new_tokens M, EOS and pad ids.
    rng: batch b of the length-sorted prompts samples with `fold_in(rng, b)`.
    batch_size: rows per generate call; must divide evenly over the plan's batch axes.

  Returns:
    Samples in the order of `prompts`.
  """
  if role.head != "lm":
    raise ValueError(f"role {role.name!r} has a {role.head!r} head; only an lm head generates")
  vocab = role.model_cfg.vocab_size
  # Out-of-range ids would embed as NaN and sample padding, silently.
  ids = np.fromiter(itertools.chain.from_iterable(prompts), np.int64)
  if ids.size and not 0 <= ids.min() <= ids.max() < vocab:
    i, bad = next((i, t) for i, p in enumerate(prompts) for t in p if not 0 <= t < vocab)
    raise ValueError(f"prompt {i} has token id {bad}, outside the model's vocabulary of "
                     f"{vocab} (a tokenizer of another model?)")
  n, steps = len(prompts), cfg.max_new_tokens
  tokens = np.full((n, steps), cfg.pad_id, np.int32)
  logprobs = np.zeros((n, steps), np.float32)
  lengths = np.zeros((n,), np.int32)
  order = sorted(range(n), key=lambda i: len(prompts[i]))
  for b, start in enumerate(range(0, n, batch_size)):
    rows = order[start:start + batch_size]
    chunk = [list(prompts[i]) for i in rows]
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    length = padded_length(max(len(p) for p in chunk), length_bucket)
    prompt_tokens, segment_ids = sampling.left_pad(padded, cfg.pad_id, length)
    batch_sharding = sharding.data_sharding(role.mesh, 2, role.rules, prompt_tokens.shape)
    with jax.set_mesh(role.mesh):
      out = sampling.generate(role.graphdef, role.model_cfg, role.params,
                              jax.device_put(prompt_tokens, batch_sharding),
                              jax.device_put(segment_ids, batch_sharding),
                              jax.random.fold_in(rng, b), cfg)
    out = jax.device_get(out)
    k = len(rows)
    tokens[rows], logprobs[rows], lengths[rows] = out.tokens[:k], out.logprobs[:k], out.lengths[:k]
    log(f"{min(start + batch_size, n)}/{n} prompts")
  mask = (np.arange(steps)[None, :] < lengths[:, None]).astype(np.float32)
  last = tokens[np.arange(n), np.maximum(lengths - 1, 0)]
  finished = (lengths > 0) & (last == cfg.eos_id)
  return Samples([list(p) for p in prompts], tokens, logprobs, mask, finished)


def decode(samples: Samples, tokenizer: Tokenizer) -> list[str]:
  """Each row's text without EOS, stripped."""
  return [tokenizer.decode([t for t in samples.answer(i) if t != tokenizer.eos_id]).strip()
          for i in range(len(samples.prompts))]


def training_rows(samples: Samples, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Prompt + answer as right-padded rows for a teacher-forced pass (RLHF updates, tests).

  Returns [N, length] arrays: tokens, targets (tokens shifted by one), positions, segment_ids,
  answer_mask (1.0 where the target is a generated token) and logprobs (the rollout's logprob of
  that target, 0 elsewhere). A prompt + answer longer than length + 1 is an error.
  """
  n = len(samples.prompts)
  out = {name: np.zeros((n, length), dtype) for name, dtype in (
      ("tokens", np.int32), ("targets", np.int32), ("positions", np.int32),
      ("segment_ids", np.int32), ("answer_mask", np.float32), ("logprobs", np.float32))}
  out["tokens"][:], out["targets"][:] = pad_id, pad_id
  for i, prompt in enumerate(samples.prompts):
    answer = samples.answer(i)
    sequence = prompt + answer
    if len(sequence) > length + 1:
      raise ValueError(f"row {i}: prompt ({len(prompt)}) + answer ({len(answer)}) tokens exceed "
                       f"the row length {length} + 1")
    used = len(sequence) - 1
    out["tokens"][i, :used] = sequence[:-1]
    out["targets"][i, :used] = sequence[1:]
    out["positions"][i, :used] = np.arange(used)
    out["segment_ids"][i, :used] = 1
    first = len(prompt) - 1  # the position whose target is the first answer token
    out["answer_mask"][i, first:first + len(answer)] = 1.0
    out["logprobs"][i, first:first + len(answer)] = samples.logprobs[i, :len(answer)]
  return out


@dataclasses.dataclass(frozen=True)
class Conversation:
  """User turns to play, with an optional system message and text appended to every user turn."""

  questions: tuple[str, ...]
  system: str | None = None
  appended: str | None = None

  def user_text(self, turn: int) -> str:
    question = self.questions[turn]
    return f"{question} {self.appended}" if self.appended else question

  def messages(self, turn: int, replies: Sequence[str], first: int = 0) -> list[dict]:
    """The dialog up to user turn `turn` (0-based), with `replies` as the earlier answers; the
    history starts at turn `first` (the system message is always kept)."""
    messages = [{"role": "system", "content": self.system}] if self.system else []
    for t in range(first, turn):
      messages += [{"role": "user", "content": self.user_text(t)},
                   {"role": "assistant", "content": replies[t] or "..."}]
    return messages + [{"role": "user", "content": self.user_text(turn)}]


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  finished: bool  # ended with EOS within the token budget
  tokens: int = 0  # generated, EOS included
  dropped_turns: int = 0  # earliest turns left out of the history to fit the prompt budget


def fitting_prompt(tokenizer: Tokenizer, conversation: Conversation, turn: int,
                   replies: Sequence[str], max_prompt_tokens: int | None) -> tuple[list[int], int]:
  """(prompt tokens, dropped turns): the turn's prompt with the fewest earliest turns left out
  that brings it within `max_prompt_tokens` (the system message always stays), as a chat
  deployment keeps a long conversation inside its context window."""
  for first in range(turn + 1):
    tokens = tokenizer.encode_dialog(conversation.messages(turn, replies, first)).tokens
    if max_prompt_tokens is None or len(tokens) <= max_prompt_tokens:
      return tokens.tolist(), first
  raise ValueError(f"turn {turn + 1} of the conversation starting {conversation.questions[0]!r}: "
                   f"the system message and the user turn alone are {len(tokens)} tokens, over "
                   f"the prompt budget of {max_prompt_tokens}")


def converse(role: Role, tokenizer: Tokenizer, conversations: Sequence[Conversation],
             cfg: sampling.SamplingConfig, rng: jax.Array, *, batch_size: int = 64,
             length_bucket: int = LENGTH_BUCKET, max_prompt_tokens: int | None = None,
             log: Callable[[str], None] = lambda text: None) -> list[list[Reply]]:
  """Plays every conversation to its last turn, each reply sampled with the conversation's own
  earlier replies in its history; returns replies[conversation][turn].

  Turn t of all conversations is one `generate` call (rng folded with t); `cfg.eos_id` must be
  the tokenizer's. With `max_prompt_tokens`, a history that outgrows it loses its earliest turns
  (`fitting_prompt`; each reply records how many).
  """
  replies: list[list[Reply]] = [[] for _ in conversations]
  turns = max((len(c.questions) for c in conversations), default=0)
  for turn in range(turns):
    active = [i for i, c in enumerate(conversations) if turn < len(c.questions)]
    fitted = [fitting_prompt(tokenizer, conversations[i], turn, [r.text for r in replies[i]],
                             max_prompt_tokens) for i in active]
    samples = generate(role, [prompt for prompt, _ in fitted], cfg,
                       jax.random.fold_in(rng, turn), batch_size=batch_size,
                       length_bucket=length_bucket)
    for index, text, finished, length, (_, dropped) in zip(
        active, decode(samples, tokenizer), samples.finished, samples.lengths, fitted):
      replies[index].append(Reply(text, bool(finished), int(length), dropped))
    log(f"turn {turn + 1}/{turns}: {len(active)} replies")
  return replies
