"""Causal grouped-query attention behind one signature, with four implementations.

  xla     the reference: einsums and a float32 softmax, any mask, any device.
  blocked the reference's math one block of queries at a time, each against only the keys at
          or before it, heads leading (XLA:CPU batches its products faster that way): on a
          2-core CPU a third of the reference's time, fwd+bwd, at T = 512.
  cudnn   `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs; XLA elsewhere).
  splash  the Pallas TPU splash-attention kernel (interpret mode off TPU, for tests).

All take q [B, T, N, H], k and v [B, S, K, H] with N a multiple of K (query head j uses KV head
j // (N // K), Meta's `repeat_kv` grouping), segment ids for both sides (0 marks padding; tokens
attend only within their own segment, so packed examples never see each other), and the slot of
every query and key (causal: a query sees keys at slots <= its own). Kernels handle the square
self-attention case (T == S, slots 0..T-1: training, and a prefill into an empty cache);
attention against a KV cache always uses `xla`'s math, over the cache's heads-first layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lm import sharding
from lm.configs import ATTENTION_IMPLS

# Large but finite, so a row whose keys are all masked (padding) gives a harmless uniform average
# rather than NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def make_mask(
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
    q_slots: jax.Array, kv_slots: jax.Array,
) -> jax.Array:
  """Boolean mask [B, T, S]: same segment and key slot <= query slot.

  Args:
    q_segment_ids: [B, T] int. kv_segment_ids: [B, S] int.
    q_slots: [B, T] or [T] int, position of each query in the key sequence.
    kv_slots: [S] int.
  """
  q_slots = jnp.broadcast_to(q_slots, q_segment_ids.shape)
  causal = kv_slots[None, None, :] <= q_slots[:, :, None]
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return causal & same_segment


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  kv_heads_first: bool = False) -> jax.Array:
  """Reference attention. q [B,T,N,H], k/v [B,S,K,H] (or [B,K,S,H] with `kv_heads_first`, the
  KV cache's layout), mask [B,T,S] bool -> [B,T,N,H]."""
  if kv_heads_first:
    return _cache_attention(q, k, v, mask)
  batch, q_len, n_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, q_len, kv_heads, n_heads // kv_heads, head_dim)
  scores = jnp.einsum(
      "BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32
  ) * (head_dim ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
  return out.reshape(batch, q_len, n_heads, head_dim)


def _cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`xla_attention` against a KV cache laid out [B,K,S,H], as two batched products per row and
  KV head in the layout XLA:CPU hands to YNNPACK in bf16 as in fp32: scores [G*T,H] x [S,H]^T,
  then output [G*T,S] x [S,H], both accumulated in float32. With the probabilities transposed
  into the output product instead, XLA:CPU ran it on Eigen over a float32 copy of the value
  cache at every bf16 decode step (1.9x slower attention on bench-50M's decode shape)."""
  batch, q_len, n_heads, head_dim = q.shape
  kv_heads, group, slots = k.shape[1], n_heads // k.shape[1], k.shape[2]
  q = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, group * q_len, head_dim)  # [B,K,G*T,H], G major
  scores = jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  mask = jnp.broadcast_to(mask[:, None, None], (batch, 1, group, q_len, slots))
  scores = jnp.where(mask.reshape(batch, 1, group * q_len, slots), scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKQS,BKSH->BKQH", probs, v, preferred_element_type=jnp.float32)
  out = out.astype(v.dtype).reshape(batch, kv_heads, group, q_len, head_dim)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, n_heads, head_dim)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                      kv_segment_ids: jax.Array, block: int) -> jax.Array:
  """Causal self-attention (T == S, slots 0..T-1) in query blocks of `block`: block i's scores
  are [.., block, (i + 1) * block], so the keys after it (masked anyway) are never computed,
  about (1 + 1/blocks) / 2 of the reference's products. The softmax is the reference's, over
  the same unmasked keys. q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H]."""
  batch, length, n_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  # Heads before positions: each score product is then a batch of contiguous [block, H] x
  # [H, S] matrices.
  q = q.reshape(batch, length, kv_heads, n_heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  slots = jnp.arange(length)
  starts = range(0, length, block)
  # Split, not sliced: the gradient of a split is one concatenation, while the gradients of
  # slices are padded to the full length and summed, a full-size add per block.
  q_blocks = jnp.split(q, list(starts)[1:], axis=3)
  outs = []
  for start, q_block in zip(starts, q_blocks):
    stop = min(start + block, length)
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", q_block, k[:, :, :stop],
                        preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    mask = make_mask(q_segment_ids[:, start:stop], kv_segment_ids[:, :stop], slots[start:stop],
                     slots[:stop])
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("BKGTS,BKSH->BKGTH", probs, v[:, :, :stop]))
  out = jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, n_heads, head_dim)


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids) -> jax.Array:
  """`jax.nn.dot_product_attention`; cuDNN's fused kernel on GPU, XLA's elsewhere."""
  mask = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  implementation = "cudnn" if jax.default_backend() == "gpu" else None
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation=implementation
  )


def _splash_kernel(n_heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  block = min(512, seq_len)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block,
  )
  mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len))] * n_heads)
  return splash.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  ), splash.SegmentIds


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, interpret=None,
                     rules: sharding.Rules = sharding.DEFAULT_RULES) -> jax.Array:
  """The Pallas splash kernel, under `shard_map` when a mesh is active (batch and heads split as
  `rules` split them)."""
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  head_dim = q.shape[-1]

  def per_shard(q, k, v, q_seg, kv_seg):
    kernel, segment_ids = _splash_kernel(q.shape[2], q.shape[1], interpret)
    # The kernel takes [heads, length, head_dim] and leaves scaling to the caller.
    q = jnp.swapaxes(q, 1, 2) * (head_dim ** -0.5)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=segment_ids(qs, ks)))(
        q, k, v, q_seg, kv_seg
    )
    return jnp.swapaxes(out, 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return per_shard(q, k, v, q_segment_ids, kv_segment_ids)
  batch_axes = sharding.logical_to_spec(("batch",), rules, mesh, q.shape[:1])[0]
  head_axes = sharding.logical_to_spec(
      ("act_kv_heads",), rules, mesh, k.shape[2:3]
  )[0]
  qkv_spec = P(batch_axes, None, head_axes, None)
  seg_spec = P(batch_axes, None)
  return jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec), out_specs=qkv_spec,
      check_vma=False,
  )(q, k, v, q_segment_ids, kv_segment_ids)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
    q_slots: jax.Array | None = None, impl: str = "xla",
    rules: sharding.Rules = sharding.DEFAULT_RULES, block: int = 64,
    kv_heads_first: bool = False,
) -> jax.Array:
  """Causal attention with segment masking.

  Args:
    q: [B, T, N, H]. k, v: [B, S, K, H].
    q_segment_ids: [B, T]; kv_segment_ids: [B, S]. Equal ids attend; 0 is padding.
    q_slots: [B, T] or [T], each query's slot among the S keys. None means self-attention over
      the same T positions (T == S), the case the fused kernels implement.
    impl: "xla", "blocked", "cudnn" or "splash"; with `q_slots` given, "xla" is always used.
    rules: the sharding plan, for the kernels that run per shard (splash).
    block: the query block of "blocked".
    kv_heads_first: k and v are [B, K, S, H], the KV cache's layout (only with `q_slots`).

  Returns:
    [B, T, N, H] in v's dtype.
  """
  square = q_slots is None
  if square and kv_heads_first:
    raise ValueError("kv_heads_first is the KV cache's layout; it needs q_slots")
  if square and q.shape[1] != k.shape[1]:
    raise ValueError(f"self-attention needs T == S, got q {q.shape} and k {k.shape}")
  if impl == "splash" and square:
    return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, rules=rules)
  if impl == "cudnn" and square:
    return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids)
  if impl == "blocked" and square:
    return blocked_attention(q, k, v, q_segment_ids, kv_segment_ids, block)
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}")
  kv_slots = jnp.arange(k.shape[2 if kv_heads_first else 1])
  mask = make_mask(q_segment_ids, kv_segment_ids, kv_slots if square else q_slots, kv_slots)
  return xla_attention(q, k, v, mask, kv_heads_first)

