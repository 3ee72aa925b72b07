"""The KV cache: each layer's keys and values for S slots, laid out by the sharding plan.

Generation (`lm/sampling.py`) creates one per call with `init_cache`; the model
(`model.apply(..., cache=)`) writes each step's keys and values into it and attends over it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm import sharding
from lm.configs import ModelConfig


class KVCache(NamedTuple):
  """Keys and values of every layer for S slots, and which slots are filled.

  k, v: [L, B, K, S, H] in the compute dtype, or (for the unrolled layer loop, `layers=`) a tuple
  of L arrays [B, K, S, H]. Heads come before slots so that a decode step's products read each
  head's keys in place: with slots first, XLA:CPU copied every layer's whole cache into that
  order at every step (three quarters of a decode step on the tiny model). segment_ids: [B, S]
  (0 = padding or not yet written). index: scalar int32, the number of slots written so far (the
  same for every row: prompts are left-padded, see lm/sampling.py).
  """

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  index: jax.Array


CACHE_NAMES = ("layers", "batch", "act_kv_heads", "cache_length", None)


def init_cache(cfg: ModelConfig, batch: int, length: int,
               rules: sharding.Rules = sharding.DEFAULT_RULES, per_layer: bool = False) -> KVCache:
  """An empty cache for `batch` rows and `length` slots, laid out by the plan's `rules` (rows
  over the batch axes, KV heads over the tensor axis) when created under a mesh.

  `per_layer` keeps each layer's keys and values in an array of its own, for the unrolled layer
  loop: a decode step then writes its new slot in place, where a stacked cache would be sliced
  and stacked again (a copy of the whole cache per step).
  """
  dtype = jnp.dtype(cfg.compute_dtype)
  if per_layer:
    layer = (batch, cfg.kv_heads, length, cfg.head_dim)
    zeros = tuple(sharding.shard(jnp.zeros(layer, dtype), CACHE_NAMES[1:], rules)
                  for _ in range(cfg.n_layers))
  else:
    shape = (cfg.n_layers, batch, cfg.kv_heads, length, cfg.head_dim)
    zeros = sharding.shard(jnp.zeros(shape, dtype), CACHE_NAMES, rules)
  return KVCache(
      k=zeros, v=zeros, segment_ids=sharding.shard(jnp.zeros((batch, length), jnp.int32),
                                                   ("batch", "cache_length"), rules),
      index=jnp.zeros((), jnp.int32),
  )
