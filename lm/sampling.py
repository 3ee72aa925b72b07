"""Batched generation: one prefill, then a decode loop over a preallocated KV cache, in one jit.

Prompts of different lengths are left-padded so every row's next token lands in the same cache
slot; padding has segment id 0 and is never attended to, and RoPE positions count real tokens
only, so a padded row computes exactly what it would alone. Each row stops at its own EOS.

Sampling follows Meta's reference code (LLAMA2.md §2.2): temperature 0.6 and nucleus top-p 0.9 by
default, temperature 0 is greedy; top-k is available too. Everything here works unchanged on a
sharded mesh: call it under `jax.set_mesh(mesh)` with params on their shardings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import kv_cache
from lm import model as model_lib
from lm import sharding
from lm.configs import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each next token, and when to stop."""

  temperature: float = 0.6
  top_p: float = 0.9
  top_k: int = 0  # 0 disables top-k
  max_new_tokens: int = 128
  eos_id: int = 2
  pad_id: int = 0
  # Run the layers one after another over per-layer weights split once per call, with a cache
  # array per layer written in place, instead of the model's scan, which on XLA:CPU copies every
  # layer's weights out of the stack at every decode step (README, "Speed on CPU"; the same
  # tokens up to float rounding). None: on for a model that does not scan its layers
  # (`scan_layers=False`), and when `generate` runs on CPU devices and the model has at most
  # UNROLL_MAX_LAYERS layers (compile time grows with depth); accelerators keep the scan otherwise.
  # See `model.Transformer.hidden_states`.
  unroll_layers: bool | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0 or self.max_new_tokens <= 0:
      raise ValueError(f"need top_k >= 0 and max_new_tokens > 0, got {self}")


UNROLL_MAX_LAYERS = 32


def resolve_unroll(cfg: SamplingConfig, model_cfg: ModelConfig, params) -> SamplingConfig:
  """`cfg` with `unroll_layers` decided: kept when set, else on for a model that does not scan
  its layers and for CPU-resident params of a model of at most UNROLL_MAX_LAYERS layers."""
  if cfg.unroll_layers is not None:
    return cfg
  if not model_cfg.scan_layers:
    return dataclasses.replace(cfg, unroll_layers=True)
  leaf = jax.tree.leaves(params)[0]
  on_cpu = (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
            and all(d.platform == "cpu" for d in leaf.devices()))
  return dataclasses.replace(cfg, unroll_layers=on_cpu and model_cfg.n_layers <= UNROLL_MAX_LAYERS)


class Generation(NamedTuple):
  """tokens [B, M] (pad after EOS), lengths [B] (EOS included), logprobs [B, M] of each sampled
  token under the model's own (temperature 1) distribution, 0 after the end."""

  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array


# A nucleus is first looked for among this many most likely tokens; the whole vocabulary is
# sorted only when some row's candidates hold at most top_p of its mass. Sorting [128, 1024]
# logits took 32 ms on a 2-core CPU, top-64 3 ms: two thirds of a GAtt decode step.
NUCLEUS_CANDIDATES = 64


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float = 1.0,
                 top_k: int = 0) -> jax.Array:
  """Draws one token per row from logits [B, V] -> [B] int32.

  Top-k keeps the k most likely tokens; top-p then keeps the smallest prefix of the sorted
  distribution whose mass reaches p (a token is dropped when the mass before it exceeds p).
  """
  if temperature == 0:
    return greedy_token(logits)
  logits = logits.astype(jnp.float32) / temperature
  if top_k == 0 and top_p >= 1.0:
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  if top_k == 0:
    return _nucleus(logits, rng, top_p)
  sorted_logits, order = jax.lax.top_k(logits, top_k)
  if top_p < 1.0:
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before > top_p, -jnp.inf, sorted_logits)
  choice = jax.random.categorical(rng, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def greedy_token(logits: jax.Array) -> jax.Array:
  """`jnp.argmax` over the last axis, [..., V] -> [...] int32: the first index of the maximum (of
  the first NaN, if any). Written as a max and then a min over the indices that reach it, two
  plain reductions: XLA:CPU's argmax (one reduction over value-index pairs) took 2.2x as long
  on a decode step's [8, 32000] logits."""
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  at_top = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(at_top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def _nucleus(logits: jax.Array, rng: jax.Array, top_p: float) -> jax.Array:
  """Top-p sampling from logits [B, V] -> [B], over the top NUCLEUS_CANDIDATES tokens when they
  hold the nucleus, else over the sorted vocabulary. Either way, the draw is the Gumbel-max one
  `jax.random.categorical` makes over the whole sorted vocabulary (noise for all V tokens, the
  ones outside the nucleus at -inf), so the token does not depend on the path taken."""
  vocab = logits.shape[-1]
  log_total = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  noise = jax.random.gumbel(rng, logits.shape, logits.dtype)

  def draw(candidates: int) -> tuple[jax.Array, jax.Array]:
    sorted_logits, order = jax.lax.top_k(logits, candidates)
    probs = jnp.exp(sorted_logits - log_total)
    mass = jnp.cumsum(probs, axis=-1)
    kept = jnp.where(mass - probs > top_p, -jnp.inf, sorted_logits)  # mass before each token
    choice = jnp.argmax(kept + noise[:, :candidates], axis=-1)
    token = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return token, mass[:, -1]

  if vocab <= NUCLEUS_CANDIDATES:
    return draw(vocab)[0]
  token, candidates_mass = draw(NUCLEUS_CANDIDATES)
  # The next token's mass before it is the candidates' mass: above top_p, it and every later one
  # are dropped, so the nucleus lies among the candidates.
  return jax.lax.cond(jnp.all(candidates_mass > top_p), lambda: token,
                      lambda: draw(vocab)[0])


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens [B, P], segment_ids [B, P]) left-padded to P (default: the longest)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  longest = max(len(p) for p in prompts)
  length = longest if length is None else length
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than the padded length {length}")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
    segment_ids[row, length - len(prompt):] = 1
  return tokens, segment_ids


def _positions(segment_ids: jax.Array) -> jax.Array:
  """RoPE positions that count real tokens only: [0, 0, 0, 1, 2] for segment ids [0, 0, 1, 1, 1]."""
  return jnp.maximum(jnp.cumsum(segment_ids, axis=-1) - 1, 0).astype(jnp.int32)


def _pick(cfg: SamplingConfig, logits: jax.Array, rng: jax.Array):
  token = sample_token(logits, rng, cfg.temperature, cfg.top_p, cfg.top_k)
  # The picked logit less the log-normalizer: log_softmax's value at the token without writing
  # out the whole [B, V] log-softmax.
  logits = logits.astype(jnp.float32)
  logit = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return token, logit - jax.nn.logsumexp(logits, axis=-1)


def _prefill(graphdef, model_cfg, cfg, params, prompt_tokens, prompt_segment_ids, rng, length,
             layers=None):
  """Runs the prompts into a fresh cache of `length` slots; samples each row's first token."""
  # The cache is laid out by the plan the model was built with (its graphdef carries the rules).
  rules = nnx.merge(graphdef, params).rules
  cache = kv_cache.init_cache(model_cfg, prompt_tokens.shape[0], length, rules,
                              per_layer=layers is not None)
  positions = _positions(prompt_segment_ids)
  logits, cache = model_lib.apply(graphdef, params, prompt_tokens, positions=positions,
                                  segment_ids=prompt_segment_ids, cache=cache, layers=layers,
                                  last_only=True, prefill=True)
  token, logprob = _pick(cfg, logits[:, -1], jax.random.fold_in(rng, 0))
  return token, logprob, cache, positions[:, -1] + 1


def _decode(graphdef, cfg, params, token, position, cache, rng, step, layers=None):
  """Feeds each row's last token [B] at `position` [B]; samples the next."""
  logits, cache = model_lib.apply(graphdef, params, token[:, None], positions=position[:, None],
                                  segment_ids=jnp.ones((token.shape[0], 1), jnp.int32),
                                  cache=cache, layers=layers)
  token, logprob = _pick(cfg, logits[:, -1], jax.random.fold_in(rng, step))
  return token, logprob, cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(graphdef, model_cfg: ModelConfig, cfg: SamplingConfig, params, prompt_tokens,
              prompt_segment_ids, rng) -> Generation:
  batch, prompt_len = prompt_tokens.shape
  steps = cfg.max_new_tokens
  # Split outside the decode loop, so each layer's weights are sliced once per call.
  layers = model_lib.split_layers(params) if cfg.unroll_layers else None
  first, first_logprob, cache, next_position = _prefill(
      graphdef, model_cfg, cfg, params, prompt_tokens, prompt_segment_ids, rng, prompt_len + steps,
      layers)
  tokens = jnp.full((batch, steps), cfg.pad_id, jnp.int32).at[:, 0].set(first)
  logprobs = jnp.zeros((batch, steps), jnp.float32).at[:, 0].set(first_logprob)
  done = first == cfg.eos_id
  lengths = jnp.ones((batch,), jnp.int32)

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < steps) & ~jnp.all(done)

  def body(state):
    step, tokens, logprobs, done, lengths, cache = state
    token, logprob, cache = _decode(graphdef, cfg, params, tokens[:, step - 1],
                                    next_position + step - 1, cache, rng, step, layers)
    token = jnp.where(done, cfg.pad_id, token)
    tokens = tokens.at[:, step].set(token)
    logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == cfg.eos_id)
    return step + 1, tokens, logprobs, done, lengths, cache

  state = (jnp.ones((), jnp.int32), tokens, logprobs, done, lengths, cache)
  _, tokens, logprobs, _, lengths, _ = jax.lax.while_loop(cond, body, state)
  return Generation(tokens, lengths, logprobs)


# The one program behind `generate`, for compiling ahead of time (`lm aot`): lower it with
# (graphdef, model_cfg, cfg, params, prompt_tokens, prompt_segment_ids, rng).
generate_program = _generate

_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1, 2, 7))
_decode_jit = jax.jit(_decode, static_argnums=(0, 1), donate_argnums=(5,))


def stream(graphdef, model_cfg: ModelConfig, params, prompt: Sequence[int], rng: jax.Array,
           cfg: SamplingConfig = SamplingConfig()) -> Iterator[int]:
  """Yields one prompt's new tokens as they are sampled (for interactive use), stopping after
  EOS or `max_new_tokens`. The same numbers as `generate` for a batch of one."""
  tokens, segment_ids = left_pad([prompt])
  length = tokens.shape[1] + cfg.max_new_tokens
  cfg = resolve_unroll(cfg, model_cfg, params)
  layers = model_lib.split_layers(params) if cfg.unroll_layers else None
  token, _, cache, position = _prefill_jit(graphdef, model_cfg, cfg, params, jnp.asarray(tokens),
                                           jnp.asarray(segment_ids), rng, length, layers)
  for step in range(1, cfg.max_new_tokens + 1):
    value = int(token[0])
    yield value
    if value == cfg.eos_id or step == cfg.max_new_tokens:
      return
    token, _, cache = _decode_jit(graphdef, cfg, params, token, position + step - 1, cache, rng,
                                  step, layers)


def generate(graphdef, model_cfg: ModelConfig, params, prompt_tokens: jax.Array,
             prompt_segment_ids: jax.Array, rng: jax.Array,
             cfg: SamplingConfig = SamplingConfig()) -> Generation:
  """Continues left-padded prompts.

  Args:
    graphdef, params: the model, as returned by `lm.model.create`.
    model_cfg: its ModelConfig (sets the cache shape and dtype).
    prompt_tokens: [B, P] int, left-padded (see `left_pad`).
    prompt_segment_ids: [B, P] int, 1 on prompt tokens and 0 on padding.
    rng: a PRNG key; sampling is deterministic given it.
    cfg: temperature, top-p, top-k, the number of new tokens M, EOS and pad ids.

  Returns:
    A `Generation` with tokens [B, M], lengths [B] and logprobs [B, M].
  """
  total = prompt_tokens.shape[1] + cfg.max_new_tokens
  if total > model_cfg.max_seq_len * 2:
    # Meta's code allows 2x the trained context as inference headroom (LLAMA2.md §1.5).
    raise ValueError(f"prompt ({prompt_tokens.shape[1]}) + max_new_tokens "
                     f"({cfg.max_new_tokens}) exceeds 2 x max_seq_len ({model_cfg.max_seq_len})")
  cfg = resolve_unroll(cfg, model_cfg, params)
  return _generate(graphdef, model_cfg, cfg, params, jnp.asarray(prompt_tokens, jnp.int32),
                   jnp.asarray(prompt_segment_ids, jnp.int32), rng)
