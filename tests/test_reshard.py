"""Resharding a parameter tree between the training plan (FSDP) and the rollout plan (TP).

Moves between meshes of different shapes over the same 8 devices, as PPO does every iteration:
values bit-identical, shardings exactly the target's, buffers reused or freed as promised, and
the peak of live bytes about one layer slice above source + destination.
"""

import gc
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lm import configs, model, reshard, sharding

TRAIN_MESH = (1, 1, 8, 1)  # (dcn, data, fsdp, tensor)
ROLLOUT_MESH = (1, 2, 1, 4)


def _mesh(shape):
  return sharding.make_mesh(sharding.MeshConfig(*shape))


@pytest.fixture(scope="module")
def setup():
  cfg = configs.get_preset("tiny", n_layers=4)
  train_mesh, rollout_mesh = _mesh(TRAIN_MESH), _mesh(ROLLOUT_MESH)
  return dict(
      cfg=cfg,
      params=model.create(cfg, train_mesh, sharding.DEFAULT_RULES, seed=0)[1],
      train=model.param_shardings(cfg, train_mesh, sharding.DEFAULT_RULES),
      rollout=model.param_shardings(cfg, rollout_mesh, sharding.ROLLOUT_RULES),
  )


def _params(setup, scale=1.0):
  """A fresh copy of the FSDP params (times `scale`), safe to donate. Creating a model compiles
  its init every time (seconds); an elementwise op keeps each leaf's sharding."""
  return jax.tree.map(lambda x: x * scale, setup["params"])


def _assert_same_values(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _assert_on(tree, shardings):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
    assert x.sharding == s, jax.tree_util.keystr(path)


def _pointer(x):
  return x.addressable_shards[0].data.unsafe_buffer_pointer()


def _device_bytes():
  """Bytes the live arrays hold on the devices, each buffer once.

  Not the sum of `nbytes`: a cross-mesh device_put leaves single-device views of the source's
  shards alive (aliases, no new memory), and replicas are real memory that `nbytes` ignores.
  """
  buffers = {}
  for a in jax.live_arrays():
    for shard in a.addressable_shards:
      buffers[shard.device.id, shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
  return sum(buffers.values())


def _bytes_on(shape, dtype, s):
  """Device bytes of an array of `shape` on sharding `s`, replicas included."""
  return math.prod(s.shard_shape(shape)) * np.dtype(dtype).itemsize * len(s.device_set)


def _slice(s):
  return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))


def test_round_trip_is_bit_identical_and_on_target(setup):
  params = _params(setup)
  host = jax.device_get(params)
  rollout = reshard.reshard(params, setup["rollout"])
  _assert_on(rollout, setup["rollout"])
  _assert_same_values(rollout, host)
  # The rollout plan really is another layout: FSDP shards are gone, tensor parallelism stays.
  wq = rollout["layers"]["attention"]["wq"]
  assert "fsdp" not in str(wq.sharding.spec) and wq.sharding.mesh.shape["tensor"] == 4
  back = reshard.reshard(rollout, setup["train"])
  _assert_on(back, setup["train"])
  _assert_same_values(back, host)
  assert not any(x.is_deleted() for x in jax.tree.leaves(params)), "a copy keeps its source"


def test_out_reuses_the_destination_buffers(setup):
  first = reshard.reshard(_params(setup, scale=1.0), setup["rollout"])
  pointers = jax.tree.map(_pointer, first)
  params = _params(setup, scale=2.0)
  second = reshard.reshard(params, setup["rollout"], out=first)
  _assert_same_values(second, params)
  _assert_on(second, setup["rollout"])
  # Every buffer of `out` was donated...
  assert all(x.is_deleted() for x in jax.tree.leaves(first))
  # ...and the layer-stacked ones were written in place: the result is the very same memory.
  same = jax.tree.map(lambda x, p: _pointer(x) == p, second["layers"], pointers["layers"])
  assert all(jax.tree.leaves(same)), same
  # A mismatched `out` is refused before anything is donated.
  with pytest.raises(ValueError, match=r"out\['output'\]"):
    reshard.reshard(params, setup["rollout"], out=dict(second, output=params["output"]))
  assert not any(x.is_deleted() for x in jax.tree.leaves(second))


def test_donate_deletes_the_source(setup):
  params = _params(setup)
  host = jax.device_get(params)
  moved = reshard.reshard(params, setup["rollout"], donate=True)
  assert all(x.is_deleted() for x in jax.tree.leaves(params))
  _assert_same_values(moved, host)


def test_moves_one_layer_at_a_time_and_bounds_the_peak(setup):
  params, targets = _params(setup), setup["rollout"]
  n_layers = setup["cfg"].n_layers
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat_targets = dict(zip(flat, jax.tree.leaves(targets)))
  stacked = [name for name in flat if "'layers'" in name]
  # While a layer slice crosses it exists twice: cut from the source (on the source's slice
  # sharding) and placed on the target's slice sharding, until it is written into the donated
  # destination buffer in place. Whole leaves land directly as their destination leaf. So above
  # the steady state (source + destination) there are at most these two copies of one slice.
  # Counted per device (replicas included); the constant covers scalar layer indices.
  two_copies = {
      name: _bytes_on(x.shape[1:], x.dtype, _slice(x.sharding))
      + _bytes_on(x.shape[1:], x.dtype, _slice(flat_targets[name]))
      for name, x in flat.items() if name in stacked}
  gc.collect()
  baseline = _device_bytes()  # the source tree and whatever else is live
  # Destination buffers are allocated leaf by leaf, so the steady state grows during the move:
  # while leaf k moves it is the baseline plus the destinations of leaves 0..k.
  steady, total = {}, baseline
  for name, x in flat.items():
    total += _bytes_on(x.shape, x.dtype, flat_targets[name])
    steady[name] = total
  chunks, above = {}, {}

  def on_chunk(path, nbytes):
    name = jax.tree_util.keystr(path)
    chunks.setdefault(name, []).append(nbytes)
    above[name] = max(above.get(name, 0), _device_bytes() - steady[name])

  moved = reshard.reshard(params, targets, on_chunk=on_chunk)
  _assert_same_values(moved, params)
  assert set(chunks) == set(flat)
  for name, x in flat.items():
    expected = [x.nbytes // n_layers] * n_layers if name in stacked else [x.nbytes]
    assert chunks[name] == expected, name
    assert above[name] <= two_copies.get(name, 0) + 4096, (name, above[name])
  # Hence the peak over the whole move: at most two copies of the largest slice above steady,
  # far below a whole-tree device_put (every destination leaf in flight at once).
  assert max(above.values()) <= max(two_copies.values()) + 4096
  assert max(two_copies.values()) < reshard.tree_bytes(params) / 4


def test_sharded_leading_axis_moves_whole(setup):
  params = _params(setup)
  chunks = {}
  # Call every leaf stacked: `output` (embed over fsdp on axis 0 at the source) and
  # `tok_embeddings` (vocab over tensor on axis 0 at the target) cannot be cut along axis 0.
  moved = reshard.reshard(params, setup["rollout"], layer_axis_leaves=lambda path: True,
                          on_chunk=lambda p, n: chunks.setdefault(jax.tree_util.keystr(p), []).append(n))
  _assert_same_values(moved, params)
  _assert_on(moved, setup["rollout"])
  assert chunks["['output']"] == [params["output"].nbytes]
  assert chunks["['tok_embeddings']"] == [params["tok_embeddings"].nbytes]
