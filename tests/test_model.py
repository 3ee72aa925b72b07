"""The model: sharding invariance, remat invariance, the KV cache, heads, numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import configs, kv_cache, model, projection, sharding

CFG = configs.get_preset("tiny")
MESHES = [(1, 8, 1, 1), (1, 1, 8, 1), (1, 1, 1, 8), (1, 2, 2, 2)]  # (dcn, data, fsdp, tensor)


def batch(cfg=CFG, b=8, t=16, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)
  # Two packed examples per row, positions restarting at the second one.
  segment_ids = jnp.asarray(np.repeat([[1] * 6 + [2] * (t - 6)], b, 0), jnp.int32)
  positions = jnp.asarray(np.repeat([list(range(6)) + list(range(t - 6))], b, 0), jnp.int32)
  return tokens, segment_ids, positions


def loss_and_grads(graphdef, params, tokens, segment_ids, positions):
  def loss(p):
    logits, _ = model.apply(graphdef, p, tokens, positions=positions, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def single_device():
  graphdef, params = model.create(CFG, seed=3)
  tokens, seg, pos = batch()
  logits = jax.jit(lambda p: model.apply(graphdef, p, tokens, positions=pos, segment_ids=seg)[0])(params)
  return params, logits, loss_and_grads(graphdef, params, tokens, seg, pos)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_sharded_forward_and_grads_equal_single_device(single_device, mesh_shape):
  params1, logits1, (loss1, grads1) = single_device
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  graphdef, params = model.create(CFG, mesh, seed=3)
  # Parameters are born on their shardings: over all 8 devices, split where the mesh shards them.
  leaves = jax.tree.leaves(params)
  assert all(len(p.sharding.device_set) == 8 for p in leaves)
  model_parallel = mesh_shape[2] * mesh_shape[3] > 1
  assert any(not p.sharding.is_fully_replicated for p in leaves) == model_parallel
  tokens, seg, pos = batch()
  with jax.set_mesh(mesh):
    tokens, seg, pos = (jax.device_put(a, sharding.data_sharding(mesh)) for a in (tokens, seg, pos))
    logits = jax.jit(lambda p: model.apply(graphdef, p, tokens, positions=pos, segment_ids=seg)[0])(params)
    loss, grads = loss_and_grads(graphdef, params, tokens, seg, pos)
  # fp32 throughout; sharded reductions reorder sums, so allow a few ulps of the values (~1e-1).
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits1), atol=1e-5)
  np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               grads, grads1)


def test_packed_examples_do_not_see_each_other():
  graphdef, params = model.create(CFG)
  tokens, seg, pos = batch(b=1)
  packed = model.apply(graphdef, params, tokens, positions=pos, segment_ids=seg)[0]
  second_alone = model.apply(graphdef, params, tokens[:, 6:])[0]
  np.testing.assert_allclose(np.asarray(packed[:, 6:]), np.asarray(second_alone), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "qkv_proj"])
def test_remat_policies_do_not_change_gradients(remat):
  tokens, seg, pos = batch(b=2)
  graphdef, params = model.create(CFG)
  _, reference = loss_and_grads(graphdef, params, tokens, seg, pos)
  graphdef_remat, _ = model.create(CFG.replace(remat=remat))
  _, grads = loss_and_grads(graphdef_remat, params, tokens, seg, pos)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               grads, reference)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_give_the_scans_logits_and_gradients(remat):
  tokens, seg, pos = batch(b=2)
  graphdef, params = model.create(CFG.replace(remat=remat))
  unrolled, _ = model.create(CFG.replace(remat=remat, scan_layers=False))
  forward = jax.jit(lambda g, p: model.apply(g, p, tokens, positions=pos, segment_ids=seg)[0],
                    static_argnums=0)
  # Unrolled means no loop left in the program.
  assert "stablehlo.while" in forward.lower(graphdef, params).as_text()
  assert "stablehlo.while" not in forward.lower(unrolled, params).as_text()
  # The same ops in the same order: only XLA's fusion choices may differ.
  np.testing.assert_allclose(np.asarray(forward(unrolled, params)),
                             np.asarray(forward(graphdef, params)), atol=1e-5)
  loss, reference = loss_and_grads(graphdef, params, tokens, seg, pos)
  unrolled_loss, grads = loss_and_grads(unrolled, params, tokens, seg, pos)
  np.testing.assert_allclose(float(unrolled_loss), float(loss), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               grads, reference)


def test_blocked_attention_gives_the_reference_logits_and_gradients():
  tokens, seg, pos = batch(b=2)
  graphdef, params = model.create(CFG)
  logits = model.apply(graphdef, params, tokens, positions=pos, segment_ids=seg)[0]
  _, reference = loss_and_grads(graphdef, params, tokens, seg, pos)
  blocked, _ = model.create(CFG.replace(attention="blocked", attention_block=5))
  np.testing.assert_allclose(
      np.asarray(model.apply(blocked, params, tokens, positions=pos, segment_ids=seg)[0]),
      np.asarray(logits), atol=1e-5)  # fp32 sums in another order, as on a sharded mesh
  _, grads = loss_and_grads(blocked, params, tokens, seg, pos)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               grads, reference)


@pytest.mark.parametrize("impl,prefill,scan", [("xla", False, True), ("xla", True, True),
                                               ("blocked", True, True), ("xla", False, False)])
def test_kv_cache_decoding_reproduces_the_uncached_logits(impl, prefill, scan):
  # A prefill (an empty cache) attends among its own tokens with the model's attention, here
  # blocked in blocks of 5 that do not divide the 7 prompt tokens; the decode steps after it
  # read the keys and values it wrote.
  graphdef, params = model.create(CFG.replace(attention=impl, attention_block=5,
                                              scan_layers=scan))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
  full = model.apply(graphdef, params, tokens)[0]
  cache = kv_cache.init_cache(CFG, 2, 20)
  step = jax.jit(lambda p, t, c, pos, prefill: model.apply(graphdef, p, t, cache=c, positions=pos,
                                                           prefill=prefill), static_argnums=4)
  logits, cache = step(params, tokens[:, :7], cache, jnp.broadcast_to(jnp.arange(7), (2, 7)),
                       prefill)
  pieces = [logits]
  for i in range(7, 12):
    logits, cache = step(params, tokens[:, i:i + 1], cache, jnp.full((2, 1), i), False)
    pieces.append(logits)
  assert int(cache.index) == 12
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), atol=1e-5)


def test_layers_run_one_after_another_compute_what_the_scan_computes():
  graphdef, params = model.create(CFG, seed=5)
  tokens, seg, pos = batch(b=2)
  run = jax.jit(lambda p, layers, last_only: model.apply(
      graphdef, p, tokens, positions=pos, segment_ids=seg, layers=layers, last_only=last_only)[0],
      static_argnums=2)
  scanned = run(params, None, False)
  layers = model.split_layers(params)
  assert len(layers) == CFG.n_layers
  # The same ops in the same order: only XLA's fusion choices differ.
  np.testing.assert_allclose(np.asarray(run(params, layers, False)), np.asarray(scanned),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(run(params, layers, True)), np.asarray(scanned[:, -1:]),
                             atol=1e-5)


def test_a_per_layer_cache_decodes_as_the_stacked_one_and_needs_the_unrolled_loop():
  graphdef, params = model.create(CFG)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
  layers = model.split_layers(params)
  step = jax.jit(lambda p, t, c, pos, layers: model.apply(graphdef, p, t, cache=c, positions=pos,
                                                          layers=layers))
  outputs = []
  for per_layer in (False, True):
    cache = kv_cache.init_cache(CFG, 2, 20, per_layer=per_layer)
    assert isinstance(cache.k, tuple) == per_layer
    logits, cache = step(params, tokens[:, :7], cache, jnp.broadcast_to(jnp.arange(7), (2, 7)),
                         layers)
    pieces = [logits]
    for i in range(7, 12):
      logits, cache = step(params, tokens[:, i:i + 1], cache, jnp.full((2, 1), i), layers)
      pieces.append(logits)
    assert isinstance(cache.k, tuple) == per_layer and int(cache.index) == 12
    outputs.append(np.asarray(jnp.concatenate(pieces, 1)))
  np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)
  with pytest.raises(ValueError, match="per-layer cache"):
    model.apply(graphdef, params, tokens[:, :1],
                cache=kv_cache.init_cache(CFG, 2, 20, per_layer=True))


def test_bfloat16_weights_are_multiplied_in_bfloat16():
  # XLA:CPU has no bf16-output dot: a product asked in bf16 runs in fp32 on an fp32 copy of the
  # weight, which a decode loop keeps beside the bf16 one. `project` asks for an fp32 result.
  cfg = CFG.replace(compute_dtype="bfloat16", param_dtype="bfloat16")
  graphdef, params = model.create(cfg)
  tokens, _, _ = batch(cfg, b=2)
  hlo = jax.jit(lambda p: model.apply(graphdef, p, tokens)[0]).lower(params).as_text()
  dots = [line.split(" : (")[-1] for line in hlo.splitlines() if "dot_general" in line]
  weight_dots = [t for t in dots if t.split(" -> ")[0].count("xbf16>") == 2
                 and t.endswith("xf32>")]
  # q, k, v, o, w1, w3, w2 (scanned: once), the output projection, and attention's scores.
  assert len(weight_dots) == 9, dots
  assert not any("xf32>" in t.split(" -> ")[0] for t in dots), dots


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_out_in_weights_give_the_same_numbers_sharded(dtype):
  """weight_layout="out_in" (generation copies on CPU): every projection weight transposed by
  `projection.relayout` is multiplied the other way round; the logits are the [in, out] model's,
  on a mesh sharding the weights, and the relayout round-trips."""
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 2, 2, 2))
  cfg = CFG.replace(compute_dtype=dtype, param_dtype=dtype)
  graphdef, params = model.create(cfg, mesh, seed=3)
  out_in = cfg.replace(weight_layout="out_in")
  moved = projection.relayout(params, "in_out", "out_in")
  wq, wo = params["layers"]["attention"]["wq"], params["layers"]["attention"]["wo"]
  assert moved["layers"]["attention"]["wq"].shape == (cfg.n_layers, *wq.shape[2:], wq.shape[1])
  assert moved["layers"]["attention"]["wo"].shape == (cfg.n_layers, wo.shape[3], *wo.shape[1:3])
  assert moved["output"].shape == params["output"].shape[::-1]
  # The abstract out_in model (what a copy's graphdef and shardings come from) has these shapes.
  abstract = model.abstract_params(out_in, mesh)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, moved)
  back = projection.relayout(moved, "out_in", "in_out")
  assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
  out_in_graphdef, _ = model.abstract_model(out_in, rules=sharding.DEFAULT_RULES)
  tokens, seg, pos = batch(cfg)
  with jax.set_mesh(mesh):
    logits = [jax.jit(lambda p, g=g: model.apply(g, p, tokens, positions=pos, segment_ids=seg)[0])(p)
              for g, p in ((graphdef, params), (out_in_graphdef, moved))]
  # The same products with the weight's dimensions swapped. Only the order of a product's sums
  # may change with the kernel (bf16 here gave identical logits, fp32 2e-7 apart): fp32 gets a
  # few ulps of these O(1) logits; bf16 one ulp (2^-8) of an activation flipped by a reordered
  # sum, carried through two layers.
  atol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(logits[1]), atol=atol)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = CFG.replace(compute_dtype="bfloat16")
  graphdef, params = model.create(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  tokens, _, _ = batch(cfg, b=2)
  logits = model.apply(graphdef, params, tokens)[0]
  assert logits.dtype == jnp.float32
  reference = model.apply(model.create(CFG)[0], params, tokens)[0]
  # bf16 has 8 mantissa bits; logits of this size stay within a few percent of fp32.
  np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=5e-2)


def test_scalar_head_shares_the_backbone_and_reads_one_position_per_row():
  graphdef, params = model.create(CFG, head="scalar")
  assert set(params) == {"tok_embeddings", "layers", "norm", "score"}
  params["score"] = jnp.ones_like(params["score"])
  tokens, _, _ = batch(b=2)
  values, _ = model.apply(graphdef, params, tokens)
  assert values.shape == (2, 16)
  picked = model.values_at(values, jnp.array([3, 9]))
  np.testing.assert_allclose(np.asarray(picked), np.asarray(values)[[0, 1], [3, 9]])


def test_rmsnorm_matches_definition():
  x = jax.random.normal(jax.random.key(0), (2, 3, CFG.dim))
  norm = model.RMSNorm(CFG, rngs=nnx.Rngs(0))
  expected = x / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + CFG.norm_eps)
  np.testing.assert_allclose(np.asarray(norm(x)), expected, atol=1e-5)
