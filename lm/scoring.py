"""Reward-model scores at each answer's EOS, batched: the one forward path for a scalar-head role
(the reward stage's evaluation, `lm score`, and the RLHF stages that rank or reward samples).

Sequences (a whole dialogue in the chat format, ending with the answer's EOS) are packed whole
into rows with segment ids, positions restarting in each, so attention never crosses sequences
and a sequence scores the same whatever shares its row or how much padding follows. The score of
a sequence is the scalar head's output at its last token (LLAMA2.md §6.2 leaves the position
open [U]; the EOS closes the answer, so it has seen all of it). Scores are raw here; the paper
shows sigmoid(raw) in [0, 1] (`unit`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import model, rl, sharding
from lm.roles import Role


def pack_sequences(sequences: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Packs sequences whole, in order, into rows.

  Returns tokens, segment_ids, positions [N, T] int32 (segment k+1 for the k-th sequence of a row,
  0 padding) and index, owner [N, K] int32: the position of each sequence's last token in its row
  and the sequence's input order (-1 where a row holds fewer than K).

  Raises:
    ValueError: a sequence longer than seq_len, or an empty one.
  """
  rows: list[list[int]] = [[]]
  used = 0
  for i, sequence in enumerate(sequences):
    if not 0 < len(sequence) <= seq_len:
      raise ValueError(f"sequence {i} has {len(sequence)} tokens; a row holds 1 to {seq_len}")
    if used + len(sequence) > seq_len:
      rows.append([])
      used = 0
    rows[-1].append(i)
    used += len(sequence)
  width = max(len(r) for r in rows)
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
  out["index"] = np.zeros((len(rows), width), np.int32)
  out["owner"] = np.full((len(rows), width), -1, np.int32)
  for r, members in enumerate(rows):
    start = 0
    for k, i in enumerate(members):
      span = slice(start, start + len(sequences[i]))
      out["tokens"][r, span] = sequences[i]
      out["segment_ids"][r, span] = k + 1
      out["positions"][r, span] = np.arange(len(sequences[i]))
      out["index"][r, k] = start + len(sequences[i]) - 1
      out["owner"][r, k] = i
      start += len(sequences[i])
  return out


@functools.partial(jax.jit, static_argnums=0)
def scores_program(graphdef, params, tokens, positions, segment_ids, index):
  values, _ = model.apply(graphdef, params, tokens, positions=positions, segment_ids=segment_ids)
  return jnp.take_along_axis(values, index, axis=1)


def row_scores(role: Role, rows: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
  """The scalar head at `rows["index"]` [N, K] (float32), run `batch_size` rows at a time under
  the role's mesh and plan; the last batch is padded with empty rows."""
  if role.head != "scalar":
    raise ValueError(f"role {role.name!r} has a {role.head!r} head; scores need a scalar head")
  n = rows["tokens"].shape[0]
  out = np.zeros(rows["index"].shape, np.float32)
  with jax.set_mesh(role.mesh):
    for start in range(0, n, batch_size):
      batch = {k: rows[k][start:start + batch_size]
               for k in ("tokens", "positions", "segment_ids", "index")}
      real = batch["tokens"].shape[0]
      if real < batch_size:
        batch = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
      placed = {k: jax.device_put(v, sharding.data_sharding(role.mesh, v.ndim, role.rules, v.shape))
                for k, v in batch.items()}
      scores = scores_program(role.graphdef, role.params, placed["tokens"], placed["positions"],
                          placed["segment_ids"], placed["index"])
      out[start:start + real] = np.asarray(jax.device_get(scores))[:real]
  return out


def score_sequences(role: Role, sequences: Sequence[np.ndarray], seq_len: int,
                    batch_size: int) -> np.ndarray:
  """Raw scores [S] of token sequences, in input order."""
  if not sequences:
    return np.zeros((0,), np.float32)
  rows = pack_sequences(sequences, seq_len)
  scores = row_scores(role, rows, batch_size)
  result = np.zeros((len(sequences),), np.float32)
  real = rows["owner"] >= 0
  result[rows["owner"][real]] = scores[real]
  return result


def score_dialogues(role: Role, encode_dialog, dialogues: Sequence[Sequence[dict]], seq_len: int,
                    batch_size: int) -> np.ndarray:
  """Raw scores [S] of dialogues that end with an assistant turn (encoded with its EOS)."""
  return score_sequences(role, [np.asarray(encode_dialog(list(d)).tokens, np.int32)
                                for d in dialogues], seq_len, batch_size)


def unit(raw) -> np.ndarray:
  """The paper's score scale: sigmoid(raw) in [0, 1]."""
  return 1.0 / (1.0 + np.exp(-np.asarray(raw, np.float64)))


RANKINGS = ("safety_gated", "helpful")


@dataclasses.dataclass(frozen=True)
class RewardModels:
  """The reward models that rank (rejection sampling) or reward (PPO) samples, and how their
  scores combine: `safety_gated` is R_c of LLAMA2.md §7.3 (lm/rl.py), `helpful` the
  helpfulness RM alone (whether rejection sampling gates is left open by the paper [U])."""

  helpful: Role
  safety: Role | None
  seq_len: int
  batch_size: int
  ranking: str = "safety_gated"
  threshold: float = 0.15

  def __post_init__(self):
    if self.ranking not in RANKINGS:
      raise ValueError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
    if self.ranking == "safety_gated" and self.safety is None:
      raise ValueError("the safety-gated ranking needs a safety reward model")

  def score(self, sequences: Sequence[np.ndarray], is_safety: Sequence[bool]
            ) -> dict[str, np.ndarray]:
    """{"helpful", "safety" (when there is a safety RM), "reward"}: [S] float64 on the sigmoid
    scale, for token sequences that each end with an answer's EOS."""
    scores = {"helpful": unit(score_sequences(self.helpful, sequences, self.seq_len,
                                              self.batch_size))}
    if self.safety is not None:
      scores["safety"] = unit(score_sequences(self.safety, sequences, self.seq_len,
                                              self.batch_size))
    if self.ranking == "safety_gated":
      scores["reward"] = np.asarray(rl.safety_gated_reward(
          scores["helpful"], scores["safety"], np.asarray(is_safety, bool), self.threshold),
          np.float64)
    else:
      scores["reward"] = scores["helpful"]
    return scores
