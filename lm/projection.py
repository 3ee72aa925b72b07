"""The model's products with its weights, and the two layouts those weights can be stored in.

A projection weight is stored [*in, *out] (Meta's layout: checkpoints, conversion, training) or,
with `ModelConfig.weight_layout="out_in"`, [*out, *in] (torch's). Only generation copies use the
second (`roles.in_dtype` on CPU): at a decode step's few rows, XLA:CPU's bf16 products (YNNPACK)
ran 1.1x faster over a weight whose contracted dimension is its last, the same numbers bit for
bit (README, "Speed on CPU"). Its float32 products are slower so, which is why fp32 copies keep
[in, out].
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Each projection weight of the model (by parameter name) and how many of its leading dimensions,
# in the [*in, *out] layout, are inputs: the dimensions a product contracts.
PROJECTION_INPUTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1, "output": 1}


def project(x: jax.Array, weight: nnx.Param | jax.Array, contract: int = 1,
            out_dtype: jnp.dtype | None = None, out_in: bool = False) -> jax.Array:
  """x [..., *C] times weight [*C, *O] (or [*O, *C] when `out_in`) -> [..., *O], contracting x's
  last `contract` dims.

  Computed as one 2-D product, [rows, prod(C)] x [prod(C), prod(O)]: written as a 3-D einsum,
  XLA:CPU's backward pass transposed each [batch x length, features] gradient for the weight
  gradient (a third of the tiny model's step time went to those copies; 1.45x faster step).

  In x's dtype, or `out_dtype` accumulated in float32. Weights stored in x's narrow dtype (a bf16
  generation copy, `roles.in_dtype`) are multiplied with a float32 result asked for, then
  rounded: XLA:CPU has no bf16-output dot and would run one in float32 on a float32 copy of the
  weight, which a decode loop hoists and keeps beside the bf16 one (no byte saved). Training
  programs (float32 weights cast per use) are left as they were, so the "dots" remat policies
  keep saving bf16 outputs.
  """
  w = weight[...]
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  out = w.shape[:w.ndim - contract] if out_in else w.shape[contract:]
  rows = x.reshape(-1, math.prod(inner))
  if out_in:
    w = w.reshape(math.prod(out), math.prod(inner))
    dot = lambda a, b, **kw: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), **kw)  # noqa: E731
  else:
    w = w.reshape(math.prod(inner), math.prod(out))
    dot = jnp.dot
  if out_dtype is not None:
    y = dot(rows, w.astype(x.dtype), preferred_element_type=out_dtype)
  elif w.dtype == x.dtype and x.dtype != jnp.float32:
    y = dot(rows, w, preferred_element_type=jnp.float32).astype(x.dtype)
  else:
    y = dot(rows, w.astype(x.dtype))
  return y.reshape(*lead, *out)


def layout_order(ndim: int, inputs: int, layer_axis: bool, to_out_in: bool) -> list[int]:
  """The axis order that moves a weight of `ndim` dims, `inputs` of them inputs, from one layout
  to the other (after the stacked layers' leading axis when `layer_axis`)."""
  lead = 1 if layer_axis else 0
  split = lead + (inputs if to_out_in else ndim - lead - inputs)
  return list(range(lead)) + list(range(split, ndim)) + list(range(lead, split))


def relayout(params: Any, source: str, target: str) -> Any:
  """A model's params (the pure dict of `lm.model`) with every projection weight moved from the
  `source` weight layout to the `target` one ("in_out" or "out_in"); other leaves as they are."""
  if source == target:
    return params

  def move(path, leaf):
    name = getattr(path[-1], "key", None)
    if name not in PROJECTION_INPUTS:
      return leaf
    layer_axis = getattr(path[0], "key", None) == "layers"
    order = layout_order(leaf.ndim, PROJECTION_INPUTS[name], layer_axis, target == "out_in")
    return jnp.transpose(leaf, order)

  return jax.tree_util.tree_map_with_path(move, params)
