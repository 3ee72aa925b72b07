"""The Llama 2 model in Flax NNX, used functionally (LLAMA2.md §1.4).

Modules only declare parameters and compute: `__call__` is a pure function of its inputs, the
KV cache goes in and comes out as an argument, and there is no dropout or RNG. Library code splits
a model into (graphdef, params) once and calls `apply` inside `jax.jit`; see `create`.

Parameter names follow Meta's checkpoints (`tok_embeddings`, `layers.attention.wq`, ...), so
conversion is a renaming table. Layers are stacked on a leading `layers` axis and run with
`jax.lax.scan`, which keeps compile time flat in depth (`scan_layers=False` unrolls it). RoPE
uses the rotate-half layout (pairs `(x[i], x[i + H/2])`, as in Hugging Face checkpoints); Meta
checkpoints are permuted on import.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lm import sharding
from lm.attention import attention
from lm.configs import ModelConfig
from lm.kv_cache import CACHE_NAMES, KVCache
from lm.projection import PROJECTION_INPUTS, layout_order, project

Params = Any  # a nested dict of arrays: the pure-dict form of the model's nnx.State


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, names, init="normal") -> nnx.Param:
  dtype = jnp.dtype(cfg.param_dtype)
  if init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = cfg.init_std * jax.random.normal(rngs.params(), shape, dtype)
  # Sharding is applied by `create` from these names (with divisibility checks), not eagerly.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _weight(rngs: nnx.Rngs, cfg: ModelConfig, name: str, shape, names) -> nnx.Param:
  """Projection weight `name`, given as [*in, *out], stored in `cfg.weight_layout`."""
  if cfg.weight_layout == "out_in":
    order = layout_order(len(shape), PROJECTION_INPUTS[name], False, True)
    shape, names = tuple(shape[i] for i in order), tuple(names[i] for i in order)
  return _param(rngs, cfg, shape, names)


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps), computed in float32, cast back, then scaled by a gain."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.weight = _param(rngs, cfg, (cfg.dim,), ("embed",), init="ones")
    self.eps = cfg.norm_eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """sin, cos [B, T, H/2] in float32 for integer positions [B, T]."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  # Computed once and kept: without the barrier XLA:CPU fuses sin and cos into every op that
  # reads them, evaluating both for each head, in each layer's forward and backward pass.
  return jax.lax.optimization_barrier((jnp.sin(angles), jnp.cos(angles)))


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates pairs (x[i], x[i + H/2]) of x [B, T, heads, H] by the angles in sin/cos [B, T, H/2]."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention: N query heads share K key/value heads in contiguous groups."""

  def __init__(self, cfg: ModelConfig, rules: sharding.Rules, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    self.rules = rules
    self.wq = _weight(rngs, cfg, "wq", (d, n, h), ("embed", "q_heads", "head_dim"))
    self.wk = _weight(rngs, cfg, "wk", (d, k, h), ("embed", "kv_heads", "head_dim"))
    self.wv = _weight(rngs, cfg, "wv", (d, k, h), ("embed", "kv_heads", "head_dim"))
    self.wo = _weight(rngs, cfg, "wo", (n, h, d), ("q_heads", "head_dim", "embed"))
    self.impl, self.block = cfg.attention, cfg.attention_block
    self.out_in = cfg.weight_layout == "out_in"

  def __call__(self, x, sin, cos, segment_ids, cache_kv=None, cache_segment_ids=None, index=None,
               prefill=False):
    dtype = x.dtype
    q = project(x, self.wq, out_in=self.out_in)
    k = project(x, self.wk, out_in=self.out_in)
    v = project(x, self.wv, out_in=self.out_in)
    q = sharding.shard(q, ("batch", "length", "act_heads", None), self.rules)
    k = sharding.shard(k, ("batch", "length", "act_kv_heads", None), self.rules)
    v = sharding.shard(v, ("batch", "length", "act_kv_heads", None), self.rules)
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    q, k, v = (checkpoint_name(a, "qkv_proj") for a in (q, k, v))
    new_kv = None
    if cache_kv is None or prefill:
      out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                      impl=self.impl, rules=self.rules, block=self.block)
    if cache_kv is not None:
      cache_k, cache_v = (
          jax.lax.dynamic_update_slice(c, new.swapaxes(1, 2).astype(c.dtype), (0, 0, index, 0))
          for c, new in zip(cache_kv, (k, v)))
      cache_k, cache_v = (sharding.shard(c, CACHE_NAMES[1:], self.rules) for c in (cache_k, cache_v))
      if not prefill:
        out = attention(q, cache_k.astype(dtype), cache_v.astype(dtype),
                        q_segment_ids=segment_ids, kv_segment_ids=cache_segment_ids,
                        q_slots=index + jnp.arange(q.shape[1]), kv_heads_first=True)
      new_kv = (cache_k, cache_v)
    out = sharding.shard(out, ("batch", "length", "act_heads", None), self.rules)
    return project(out, self.wo, contract=2, out_in=self.out_in), new_kv


class FeedForward(nnx.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x)."""

  def __init__(self, cfg: ModelConfig, rules: sharding.Rules, *, rngs: nnx.Rngs):
    d, f = cfg.dim, cfg.hidden_dim
    self.rules = rules
    self.w1 = _weight(rngs, cfg, "w1", (d, f), ("embed", "mlp"))
    self.w3 = _weight(rngs, cfg, "w3", (d, f), ("embed", "mlp"))
    self.w2 = _weight(rngs, cfg, "w2", (f, d), ("mlp", "embed"))
    self.out_in = cfg.weight_layout == "out_in"

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = project(x, self.w1, out_in=self.out_in)
    up = project(x, self.w3, out_in=self.out_in)
    hidden = sharding.shard(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"), self.rules)
    return project(hidden, self.w2, out_in=self.out_in)


class Block(nnx.Module):
  """One pre-norm transformer layer."""

  def __init__(self, cfg: ModelConfig, rules: sharding.Rules, *, rngs: nnx.Rngs):
    self.rules = rules
    self.attention_norm = RMSNorm(cfg, rngs=rngs)
    self.attention = Attention(cfg, rules, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg, rngs=rngs)
    self.feed_forward = FeedForward(cfg, rules, rngs=rngs)

  def __call__(self, x, sin, cos, segment_ids, cache_kv=None, cache_segment_ids=None, index=None,
               prefill=False):
    attn_out, new_kv = self.attention(
        self.attention_norm(x), sin, cos, segment_ids, cache_kv, cache_segment_ids, index, prefill
    )
    x = sharding.shard(x + attn_out, ("batch", "length", "act_embed"), self.rules)
    x = x + self.feed_forward(self.ffn_norm(x))
    return sharding.shard(x, ("batch", "length", "act_embed"), self.rules), new_kv


# What each scanned layer keeps for the backward pass; everything else is recomputed.
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
}


class Transformer(nnx.Module):
  """Embedding, the stacked layers and the final norm: the backbone every head shares.

  `rules` (the sharding plan of its activations and KV cache) is static: it is part of the
  graphdef, so a model split under another plan compiles its own programs.
  """

  def __init__(self, cfg: ModelConfig, rules: sharding.Rules = sharding.DEFAULT_RULES, *,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.rules = tuple(rules)
    self.tok_embeddings = _param(rngs, cfg, (cfg.vocab_size, cfg.dim), ("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return Block(cfg, self.rules, rngs=rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg, rngs=rngs)

  def hidden_states(
      self, tokens: jax.Array, positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None, cache: KVCache | None = None,
      layers: list | None = None, prefill: bool = False,
  ) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states [B, T, D] for tokens [B, T], and the updated cache.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] int RoPE positions (default 0..T-1; reset per packed example).
      segment_ids: [B, T] int, 0 for padding (default all ones).
      cache: a KVCache to write the T new keys/values into at `cache.index` and attend over.
      layers: `split_layers(params)`, to run the layers one after another over these per-layer
        weights instead of scanning the stack (the same numbers). For decode loops on XLA:CPU,
        whose scan copies each layer's weights out of the stack at every step: split once
        before the loop and the copies happen once. Compile time grows with depth.
      prefill: `cache` is empty (index 0). The T tokens then attend among themselves with the
        model's own attention (`blocked`, `splash`: the kernels for the square case) and fill
        slots 0..T-1: the same numbers as attending over the cache, up to float rounding, in
        about half the time for long prompts on XLA:CPU (`blocked` skips the masked half).
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    x = jnp.take(self.tok_embeddings[...], tokens, axis=0).astype(dtype)
    x = sharding.shard(x, ("batch", "length", "act_embed"), self.rules)
    sin, cos = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

    graphdef, layer_params = nnx.split(self.layers)
    if cache is not None and isinstance(cache.k, tuple) and layers is None:
      raise ValueError("a per-layer cache (kv_cache.init_cache(per_layer=True)) needs the "
                       "unrolled layer loop: pass layers=split_layers(params)")
    if layers is not None:
      x, cache = _run_unrolled(graphdef, layers, x, sin, cos, segment_ids, cache, self.rules,
                               prefill)
      return self.norm(x), cache
    if cache is None:
      def body(x, params):
        x, _ = nnx.merge(graphdef, params)(x, sin, cos, segment_ids)
        return x, None
      xs = layer_params
    else:
      cache_segment_ids = jax.lax.dynamic_update_slice(
          cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index)
      )
      def body(x, inputs):
        params, k, v = inputs
        x, kv = nnx.merge(graphdef, params)(
            x, sin, cos, segment_ids, (k, v), cache_segment_ids, cache.index, prefill
        )
        return x, kv
      xs = (layer_params, cache.k, cache.v)
    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT[cfg.remat], prevent_cse=False)
    x, new_kv = jax.lax.scan(body, x, xs, unroll=1 if cfg.scan_layers else cfg.n_layers)
    x = self.norm(x)
    if cache is not None:
      cache = KVCache(new_kv[0], new_kv[1], cache_segment_ids, cache.index + tokens.shape[1])
    return x, cache


def split_layers(params: Params) -> list:
  """The stacked layer params [L, ...] of a model's params as L per-layer trees (`layers=`)."""
  stacked = params["layers"]
  return [jax.tree.map(lambda a, i=i: a[i], stacked)
          for i in range(jax.tree.leaves(stacked)[0].shape[0])]


def _run_unrolled(graphdef, layers, x, sin, cos, segment_ids, cache, rules, prefill=False):
  """The scan of `hidden_states` written out layer by layer over `split_layers`' trees."""
  cache_segment_ids = None
  if cache is not None:
    cache_segment_ids = jax.lax.dynamic_update_slice(
        cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
  keys, values = [], []
  for i, layer in enumerate(layers):
    layer_kv = None if cache is None else (cache.k[i], cache.v[i])
    x, kv = nnx.merge(graphdef, layer)(x, sin, cos, segment_ids, layer_kv, cache_segment_ids,
                                       None if cache is None else cache.index, prefill)
    if kv is not None:
      keys.append(kv[0])
      values.append(kv[1])
  if cache is not None:
    if isinstance(cache.k, tuple):
      keys, values = tuple(keys), tuple(values)
    else:
      keys, values = (sharding.shard(jnp.stack(c), CACHE_NAMES, rules) for c in (keys, values))
    cache = KVCache(keys, values, cache_segment_ids, cache.index + x.shape[1])
  return x, cache


class Llama(Transformer):
  """The language model: backbone plus an untied output projection [D, V]."""

  def __init__(self, cfg: ModelConfig, rules: sharding.Rules = sharding.DEFAULT_RULES, *,
               rngs: nnx.Rngs):
    super().__init__(cfg, rules, rngs=rngs)
    self.output = _weight(rngs, cfg, "output", (cfg.dim, cfg.vocab_size), ("embed", "vocab"))

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None, layers=None,
               last_only=False, prefill=False):
    """Logits [B, T, V] in float32 for tokens [B, T], and the updated cache (see hidden_states).
    `last_only` projects the last position only, [B, 1, V] (a prefill needs nothing more)."""
    x, cache = self.hidden_states(tokens, positions, segment_ids, cache, layers, prefill)
    if last_only:
      x = x[:, -1:]
    logits = project(x, self.output, out_dtype=jnp.float32,
                     out_in=self.cfg.weight_layout == "out_in")
    return sharding.shard(logits, ("batch", "length", "act_vocab"), self.rules), cache


class ScalarModel(Transformer):
  """Backbone plus a scalar head [D]: the reward models and the PPO value model."""

  def __init__(self, cfg: ModelConfig, rules: sharding.Rules = sharding.DEFAULT_RULES, *,
               rngs: nnx.Rngs):
    super().__init__(cfg, rules, rngs=rngs)
    self.score = nnx.Param(jnp.zeros((cfg.dim,), jnp.dtype(cfg.param_dtype)),
                           out_sharding=("embed",), eager_sharding=False)

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None, layers=None):
    """A scalar per position [B, T] in float32 (read one with `values_at`), and the cache."""
    x, cache = self.hidden_states(tokens, positions, segment_ids, cache, layers)
    return jnp.einsum("BTD,D->BT", x.astype(jnp.float32), self.score[...].astype(jnp.float32)), cache


def values_at(values: jax.Array, index: jax.Array) -> jax.Array:
  """values [B, T] read at one position per row, index [B] -> [B] (e.g. each answer's last token)."""
  return jnp.take_along_axis(values, index[:, None].astype(jnp.int32), axis=1)[:, 0]


HEADS = {"lm": Llama, "scalar": ScalarModel}


def abstract_model(cfg: ModelConfig, head: str = "lm",
                   rules: sharding.Rules = sharding.DEFAULT_RULES):
  """(graphdef, abstract nnx.State) without allocating anything; the graphdef carries `rules`."""
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
  return nnx.split(nnx.eval_shape(lambda: HEADS[head](cfg, rules, rngs=nnx.Rngs(0))))


def create(
    cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES, *, seed: int = 0, head: str = "lm",
) -> tuple[nnx.GraphDef, Params]:
  """Initialises a model with every parameter created directly on its sharding.

  Returns (graphdef, params) where params is a nested dict of arrays; call with `apply`.
  """
  graphdef, abstract = abstract_model(cfg, head, rules)
  shardings = None
  if mesh is not None:
    shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, rules))

  @jax.jit
  def init():
    return nnx.to_pure_dict(nnx.state(HEADS[head](cfg, rules, rngs=nnx.Rngs(seed))))

  if shardings is not None:
    init = jax.jit(init, out_shardings=shardings)
  return graphdef, init()


HEAD_PARAMS = {"lm": "output", "scalar": "score"}


def init_head(cfg: ModelConfig, mesh, rules: sharding.Rules = sharding.DEFAULT_RULES, *,
              head: str = "lm", seed: int = 0) -> jax.Array:
  """A fresh head parameter (`output` [D, V] for "lm", `score` [D] for "scalar") on its sharding,
  initialised as `create` would (the rest of the model is never materialised)."""
  key = HEAD_PARAMS[head]

  def init():
    return nnx.to_pure_dict(nnx.state(HEADS[head](cfg, rules, rngs=nnx.Rngs(seed))))[key]

  return jax.jit(init, out_shardings=param_shardings(cfg, mesh, rules, head)[key])()


def param_specs(cfg: ModelConfig, mesh, rules=sharding.DEFAULT_RULES, head: str = "lm"):
  """The PartitionSpec of every parameter on `mesh` (a Mesh or an AbstractMesh of any size)."""
  _, abstract = abstract_model(cfg, head)
  return nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, rules, specs_only=True))


def param_shardings(cfg: ModelConfig, mesh, rules=sharding.DEFAULT_RULES, head: str = "lm"):
  """The NamedSharding of every parameter, as a nested dict shaped like the params."""
  _, abstract = abstract_model(cfg, head)
  return nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, rules))


def abstract_params(cfg: ModelConfig, mesh=None, rules=sharding.DEFAULT_RULES, head: str = "lm"):
  """ShapeDtypeStructs of every parameter (with shardings when a mesh is given)."""
  _, abstract = abstract_model(cfg, head)
  shapes = nnx.to_pure_dict(abstract)
  if mesh is None:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), shapes)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, param_shardings(cfg, mesh, rules, head))


def apply(graphdef: nnx.GraphDef, params: Params, tokens: jax.Array, **kwargs):
  """Runs the model given by (graphdef, params); kwargs as in `Llama.__call__`."""
  return nnx.merge(graphdef, params)(tokens, **kwargs)
