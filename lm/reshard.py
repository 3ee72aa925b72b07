"""Moves a parameter tree between (mesh, plan)s, one layer at a time.

PPO trains the policy under FSDP and generates under a replicated / tensor-parallel plan (LLAMA2.md
§7.3: generation under FSDP was ~20x slower), so every iteration the policy's weights cross from
one layout to the other, possibly onto a mesh of another shape over the same devices. A
`jax.device_put` of the whole tree would have a second copy of every leaf in flight at once. Here
leaves cross one at a time, and a leaf stacked on the `layers` axis crosses one layer at a time
into a destination buffer updated in place (donated), so the peak stays about one layer slice
above source + destination. Passing last iteration's copy as `out` reuses its buffers, and
`donate=True` frees each source leaf once it has moved.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

KeyPath = tuple[Any, ...]


def tree_bytes(tree: Any) -> int:
  """Total bytes of the leaves' global shapes (arrays or ShapeDtypeStructs)."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _under_layers(path: KeyPath) -> bool:
  """The default test for a layer-stacked leaf: its path goes through a `layers` key."""
  return any(getattr(k, "key", getattr(k, "name", None)) == "layers" for k in path)


def _slice_sharding(s: Any) -> NamedSharding | None:
  """Where x[i] lives for x on `s`: the spec without its leading entry.

  None when `s` is not a NamedSharding or shards axis 0 itself: a layer slice would then sit on
  a subset of the devices, so such a leaf moves whole instead.
  """
  if not isinstance(s, NamedSharding):
    return None
  spec = tuple(s.spec)
  if spec and spec[0] is not None:
    return None
  return NamedSharding(s.mesh, PartitionSpec(*spec[1:]))


# Jitted pieces, one per (shape, dtype, sharding), so that repeated reshards (every PPO
# iteration) hit the compilation cache. The layer index is a traced argument: one compile per
# leaf shape, not per layer.
@functools.cache
def _take(shape, dtype, part: NamedSharding):
  """x [L, ...] on the source sharding, i -> x[i] [...] on `part` (the source slice sharding)."""
  del shape, dtype  # key only
  return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False),
                 out_shardings=part)


@functools.cache
def _write(shape, dtype, sharding: NamedSharding):
  """buf [L, ...], part [...], i -> buf with buf[i] = part, written in place (buf is donated)."""
  del shape, dtype  # key only
  return jax.jit(lambda buf, part, i: jax.lax.dynamic_update_index_in_dim(buf, part, i, 0),
                 donate_argnums=0, out_shardings=sharding)


@functools.cache
def _zeros(shape, dtype, sharding: NamedSharding):
  """A zero buffer created directly on `sharding` (never whole on one device)."""
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _check_out(path: KeyPath, x: jax.Array, target: NamedSharding, buf: jax.Array) -> None:
  if buf.shape != x.shape or buf.dtype != x.dtype or not buf.sharding.is_equivalent_to(
      target, x.ndim):
    raise ValueError(
        f"out{jax.tree_util.keystr(path)} is {buf.dtype}{list(buf.shape)} on {buf.sharding}; "
        f"expected {x.dtype}{list(x.shape)} on {target}")


def _move_layers(path, x, target, src_part, dst_part, buf, on_chunk):
  """Moves a stacked leaf x [L, ...] layer by layer into buf (allocated when None)."""
  key = (x.shape, jnp.dtype(x.dtype))
  if buf is None:
    buf = _zeros(*key, target)()
  take, write = _take(*key, src_part), _write(*key, target)
  for i in range(x.shape[0]):
    part = take(x, i)  # layer i, still in the source layout
    moved = jax.device_put(part, dst_part, may_alias=False)  # across meshes
    if on_chunk is not None:
      on_chunk(path, moved.nbytes)  # both copies of the slice are alive here: the peak
    buf = write(buf, moved, i)
    # Freed now rather than at the next loop turn, so at most one slice (two copies) is in flight.
    part.delete()
    moved.delete()
  return buf


def reshard(
    tree: Any, target_shardings: Any, *, out: Any = None, donate: bool = False,
    layer_axis_leaves: Callable[[KeyPath], bool] | None = None,
    on_chunk: Callable[[KeyPath, int], None] | None = None,
) -> Any:
  """The same values as `tree`, placed on `target_shardings`, moved leaf by leaf.

  Args:
    tree: a nested dict of jax.Arrays (e.g. the params of `lm.model.create`).
    target_shardings: NamedShardings, same structure; their mesh may differ from the source's
      (e.g. (data=1, fsdp=8) -> (data=2, tensor=4) over the same devices).
    out: optional previous result on `target_shardings`, donated: its buffers receive the values
      (stacked leaves are written in place; other leaves are freed before their copy lands), so
      no new full-size buffer is allocated. Its leaves are unusable afterwards.
    donate: delete each source leaf once it has moved (a move rather than a copy).
    layer_axis_leaves: predicate on a leaf's key path: is axis 0 the stacked `layers` axis
      [L, ...]? Such leaves move one layer slice at a time. Default: the path has a `layers` key.
    on_chunk: called as on_chunk(path, bytes) for each chunk in flight (one layer slice of a
      stacked leaf, or a whole leaf), for progress and tests.

  Returns:
    A tree like `tree` whose leaves have exactly `target_shardings`.
  """
  stacked = layer_axis_leaves or _under_layers
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  targets = treedef.flatten_up_to(target_shardings)
  outs = [None] * len(leaves) if out is None else treedef.flatten_up_to(out)
  for (path, x), target, buf in zip(leaves, targets, outs):
    if buf is not None:  # all checked before any is donated, so a mismatch consumes nothing
      _check_out(path, x, target, buf)
  results = []
  for (path, x), target, buf in zip(leaves, targets, outs):
    src_part = _slice_sharding(getattr(x, "sharding", None))
    dst_part = _slice_sharding(target)
    if stacked(path) and x.ndim and src_part is not None and dst_part is not None:
      y = _move_layers(path, x, target, src_part, dst_part, buf, on_chunk)
    else:
      if buf is not None:
        buf.delete()  # donated: freed before the new copy lands, so the peak does not grow
      # may_alias only when donating: a copy's result must never share the source's buffers,
      # or donating it later as `out` would delete the source too.
      y = jax.device_put(x, target, may_alias=donate)
      if on_chunk is not None:
        on_chunk(path, y.nbytes)
    if donate and y is not x:
      x.delete()
    results.append(y)
  return treedef.unflatten(results)
