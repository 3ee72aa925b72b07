"""Meshes, logical axis names, and the rules that map one onto the other.

Every parameter carries logical names (`vocab`, `embed`, `q_heads`, `kv_heads`, `head_dim`, `mlp`,
`layers`) and every key activation too (`batch`, `length`, `act_embed`, `act_heads`, ...). One
rules table maps logical names to mesh axes (`dcn`, `data`, `fsdp`, `tensor`). Moving between one
CPU, 8 fake devices and a pod slice is a change of mesh shape; FSDP versus tensor parallelism is a
change of rules. Activations have their own names because the same tensor dimension is sharded
differently as a parameter (`embed` over `fsdp`) and as an activation (batch over `fsdp`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("dcn", "data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# A plan is a rules table. Plans are chosen by name in a stage's config (per role) and passed to
# the model, which keeps its plan in its graphdef: the plan is part of every jit cache key, and
# nothing about sharding is read from module state at trace time.

# FSDP over `fsdp`, tensor parallelism over `tensor`, data parallelism over `data` and `dcn`.
FSDP_TP_RULES: Rules = (
    # activations
    ("batch", ("dcn", "data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)

# Pure FSDP: the `tensor` axis, if the mesh has one, joins the batch axes and nothing is split
# by heads.
FSDP_RULES: Rules = tuple(
    (name, ("dcn", "data", "fsdp", "tensor") if name == "batch"
     else None if axes == "tensor" else axes) for name, axes in FSDP_TP_RULES)

# Generation is decode-bound: gathering FSDP shards every step is what made generation under FSDP
# ~20x slower in the paper (LLAMA2.md §7.3). Rollouts keep tensor parallelism and replicate the
# rest; the `fsdp` axis then splits only the batch (and the KV cache with it).
ROLLOUT_RULES: Rules = tuple(
    (name, None if name == "embed" else axes) for name, axes in FSDP_TP_RULES)

PLANS: dict[str, Rules] = {"fsdp_tp": FSDP_TP_RULES, "fsdp": FSDP_RULES, "rollout": ROLLOUT_RULES}
DEFAULT_PLAN = "fsdp_tp"
DEFAULT_RULES: Rules = PLANS[DEFAULT_PLAN]


def plan_rules(plan: str | Rules) -> Rules:
  """The rules table of a plan given by name (see PLANS), or a table given as is."""
  if not isinstance(plan, str):
    return tuple(plan)
  if plan not in PLANS:
    raise ValueError(f"unknown sharding plan {plan!r}; choose one of {sorted(PLANS)}")
  return PLANS[plan]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes. One size may be -1: it takes the devices that are left."""

  dcn: int = 1
  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, ...]:
    sizes = [self.dcn, self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got {self}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh axis sizes must be positive or -1, got {self}")
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"{num_devices} devices cannot fill mesh {self}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}"
      )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes (dcn, data, fsdp, tensor) over `devices` (default: all devices).

  Axes are `Auto` so GSPMD propagates shardings from the parameters and the constraints we place
  on key activations (explicit-sharding meshes would demand an out_sharding on every contraction).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  try:
    if cfg.dcn > 1 and len(slices) == cfg.dcn:
      # Multi-slice: `dcn` crosses slices (data-center network), the rest stays on each slice's
      # interconnect.
      grid = mesh_utils.create_hybrid_device_mesh(
          (1,) + shape[1:], (cfg.dcn, 1, 1, 1), devices, allow_split_physical_axes=True)
    else:
      # Orders devices to follow the physical interconnect (ICI rings on TPU).
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_to_spec(
    names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  With `mesh` and `shape` given, a mesh axis is dropped from a dimension it does not divide (so a
  2-KV-head model still runs on an 8-way tensor axis, replicated there), and a mesh axis is used
  at most once per array.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim_index, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    axes = table[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for axis in axes:
      if axis in used:
        continue
      if mesh is not None:
        size = mesh.shape[axis]
        if size == 1:
          continue
        if shape is not None:
          taken = math.prod(mesh.shape[a] for a in kept)
          if shape[dim_index] % (taken * size):
            continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def _logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names is not None else (None,) * len(variable.shape)


def param_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    specs_only: bool = False) -> Any:
  """NamedShardings (or PartitionSpecs) for a (possibly abstract) NNX state, from its logical
  axis names."""

  def one(variable):
    spec = logical_to_spec(_logical_names(variable), rules, mesh, variable.shape)
    return variable.replace(spec if specs_only else NamedSharding(mesh, spec))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard(x: jax.Array, names: Sequence[str | None], rules: Rules) -> jax.Array:
  """Constrains an activation's sharding by logical names under `rules`, on the current mesh.

  Outside a mesh context (`jax.set_mesh`), or on a single device, this is the identity, so model
  code is the same on one CPU and on a pod.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  spec = logical_to_spec(names, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def data_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES,
                  shape: Sequence[int] | None = None) -> NamedSharding:
  """Sharding of a batch array [B, ...]: batch over the data-parallel axes, the rest replicated.

  With `shape`, batch axes that do not divide B are left out (a small batch is replicated).
  """
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh,
                                             shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
