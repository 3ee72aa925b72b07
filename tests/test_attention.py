"""Attention implementations against a slow, obviously-correct loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import attention, sharding


def loop_reference(q, k, v, q_seg, kv_seg):
  """Per batch row, per head, per query: softmax over the keys it may see."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, length, n_heads, head_dim = q.shape
  group = n_heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for n in range(n_heads):
      for t in range(length):
        visible = [s for s in range(t + 1) if kv_seg[b, s] == q_seg[b, t]]
        scores = np.array([q[b, t, n] @ k[b, s, n // group] for s in visible]) / np.sqrt(head_dim)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[b, t, n] = sum(w * v[b, s, n // group] for w, s in zip(weights, visible))
  return out


def random_inputs(batch=2, length=16, n_heads=4, kv_heads=2, head_dim=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, length, n_heads, head_dim))
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
  # Row 0: three packed examples; row 1: one example then padding (segment 0).
  seg = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 11 + [0] * 5], np.int32)[:batch, :length]
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
def test_matches_loop_reference_with_packing_and_gqa(impl):
  q, k, v, seg = random_inputs()
  out = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl)
  expected = loop_reference(q, k, v, np.asarray(seg), np.asarray(seg))
  real = np.asarray(seg) > 0  # padding rows are free to hold anything finite
  np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-6)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("block", [4, 5, 16])
def test_blocked_matches_loop_reference_for_any_block(block):
  # 5 leaves a short last block; 16 is one block of the whole row.
  q, k, v, seg = random_inputs()
  out = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="blocked",
                            block=block)
  expected = loop_reference(q, k, v, np.asarray(seg), np.asarray(seg))
  real = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-6)
  assert np.isfinite(np.asarray(out)).all()


def test_blocked_gradients_match_xla_on_a_sharded_mesh():
  q, k, v, seg = random_inputs(batch=4, length=32, n_heads=4, kv_heads=2, head_dim=8)
  seg = jnp.asarray(np.repeat(np.array([[1] * 9 + [2] * 23]), 4, 0), jnp.int32)

  def loss(impl, q, k, v):
    out = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl=impl, block=8)
    return jnp.sum(jnp.sin(out))

  expected = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    grads = jax.jit(jax.grad(lambda *a: loss("blocked", *a), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads, expected):  # fp32 sums in another order: 1e-5
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_splash_kernel_in_interpret_mode_matches_xla():
  q, k, v, seg = random_inputs(length=128, n_heads=4, kv_heads=2, head_dim=128)
  seg = jnp.asarray(np.repeat(np.array([[1] * 40 + [2] * 88]), 2, 0), jnp.int32)
  expected = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla")
  out = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="splash")
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_splash_kernel_sharded_over_batch_and_heads():
  q, k, v, _ = random_inputs(batch=4, length=128, n_heads=4, kv_heads=2, head_dim=128)
  seg = jnp.ones((4, 128), jnp.int32)
  expected = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl="xla")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: attention.attention(
        *a[:3], q_segment_ids=a[3], kv_segment_ids=a[3], impl="splash"))(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_the_cache_layout_attends_as_the_reference_does():
  # Keys and values heads-first ([B, K, S, H], the KV cache's layout): a chunk of queries at
  # slots 6..9 (a prefill continuing a cache) and one query (a decode step), with packing, GQA
  # and padding, against the loop reference's rows for the same queries.
  q, k, v, seg = random_inputs()
  expected = loop_reference(q, k, v, np.asarray(seg), np.asarray(seg))
  cache_k, cache_v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  for start, stop in ((6, 10), (9, 10)):
    out = attention.attention(q[:, start:stop], cache_k, cache_v,
                              q_segment_ids=seg[:, start:stop], kv_segment_ids=seg,
                              q_slots=jnp.arange(start, stop), kv_heads_first=True)
    np.testing.assert_allclose(np.asarray(out), expected[:, start:stop], atol=1e-5)
  with pytest.raises(ValueError, match="q_slots"):
    attention.attention(q, cache_k, cache_v, q_segment_ids=seg, kv_segment_ids=seg,
                        kv_heads_first=True)


def test_decode_slots_see_only_earlier_keys():
  q, k, v, seg = random_inputs(batch=1, length=8)
  seg = jnp.ones((1, 8), jnp.int32)
  full = attention.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
  one = attention.attention(q[:, 5:6], k, v, q_segment_ids=seg[:, :1], kv_segment_ids=seg,
                            q_slots=jnp.array([5]))
  np.testing.assert_allclose(np.asarray(one[:, 0]), np.asarray(full[:, 5]), atol=1e-6)
