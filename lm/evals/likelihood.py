"""Log-likelihood of continuations given contexts, batched: multiple-choice scoring.

Each (context, continuation) pair is one right-padded row; the model reads context + continuation
once and the log-probabilities of the continuation's tokens are summed. Causal attention means
the padding after a sequence changes nothing before it, so a pair scores the same whatever its
row length. Rows are bucketed to a multiple of 64 tokens and batches padded to full size, so a
task compiles a handful of programs.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import losses, model, rollout, sharding
from lm.roles import Role


@functools.partial(jax.jit, static_argnums=0)
def _summed_logprobs(graphdef, params, tokens, targets, mask):
  """tokens, targets [B, T] int32, mask [B, T] float32 -> [B] summed log p(target) under mask."""
  logits, _ = model.apply(graphdef, params, tokens)
  return jnp.sum(losses.token_logprobs(logits, targets) * mask, axis=1)


def continuation_logprobs(role: Role, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          batch_size: int = 16) -> np.ndarray:
  """Summed log p(continuation | context) of every pair, in input order.

  Args:
    role: an `lm`-head role; its mesh and plan place the rows.
    pairs: N (context, continuation) token lists; the context is at least one token (BOS) and
      the continuation at least one; together at most the model's max_seq_len.
    batch_size: rows per forward pass; must divide evenly over the plan's batch axes.

  Returns:
    [N] float32 (natural log).
  """
  if role.head != "lm":
    raise ValueError(f"role {role.name!r} has a {role.head!r} head; likelihoods need an lm head")
  limit = role.model_cfg.max_seq_len
  for i, (context, continuation) in enumerate(pairs):
    if not context or not continuation:
      raise ValueError(f"pair {i}: context and continuation need a token each")
    if len(context) + len(continuation) > limit:
      raise ValueError(f"pair {i}: {len(context)} + {len(continuation)} tokens exceed the "
                       f"model's max_seq_len {limit}")
  out = np.zeros((len(pairs),), np.float32)
  # Similar lengths share a batch, so few rows pay for a long neighbour's padding.
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    longest = max(len(pairs[i][0]) + len(pairs[i][1]) for i in rows)
    # The model reads T tokens and predicts T targets: the last token is never read.
    length = min(rollout.padded_length(longest - 1), limit)
    tokens, targets, mask = (np.zeros((batch_size, length), dtype)
                             for dtype in (np.int32, np.int32, np.float32))
    for r, i in enumerate(rows):
      context, continuation = pairs[i]
      sequence = list(context) + list(continuation)
      used = len(sequence) - 1
      tokens[r, :used], targets[r, :used] = sequence[:-1], sequence[1:]
      mask[r, len(context) - 1:used] = 1.0  # positions whose target is a continuation token
    placed = [jax.device_put(a, sharding.data_sharding(role.mesh, 2, role.rules, a.shape))
              for a in (tokens, targets, mask)]
    with jax.set_mesh(role.mesh):
      summed = _summed_logprobs(role.graphdef, role.params, *placed)
    out[rows] = np.asarray(jax.device_get(summed))[:len(rows)]
  return out
