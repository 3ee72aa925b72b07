"""Roles: the models a post-training stage holds, each with its head, plan and trainability.

A PPO stage holds five (policy and value, trainable; reference and the two reward models,
frozen), a reward-model stage one, a fine-tuning stage one. A Role is the (graphdef, params) pair
with what is needed to use it: its ModelConfig, head (`lm` or `scalar`), the mesh and sharding
plan its parameters are laid out by (the plan also sits in the graphdef, see lm/model.py), and
whether it trains.

Loading can swap the head. An `lm` checkpoint loaded as `scalar` keeps the backbone and gets a
new scalar head initialised to zeros, so every score starts at 0 and the first gradient flows
through the backbone's last hidden state (LLAMA2.md §6: the RM starts from the chat model, the
next-token classifier replaced by a regression head). A `scalar` checkpoint loaded as `lm` gets a
freshly initialised output projection (normal, `init_std`): the backbone only is carried over.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lm import checkpoints, model, projection, reshard, sharding
from lm.configs import ModelConfig

@dataclasses.dataclass(frozen=True)
class Role:
  """One model of a stage. `params` is a nested dict of arrays laid out by `plan` on `mesh`."""

  name: str
  head: str
  model_cfg: ModelConfig
  graphdef: Any
  params: Any
  mesh: jax.sharding.Mesh
  plan: str = sharding.DEFAULT_PLAN
  trainable: bool = False

  @property
  def rules(self) -> sharding.Rules:
    return sharding.plan_rules(self.plan)

  def param_shardings(self, mesh: jax.sharding.Mesh | None = None, plan: str | None = None):
    """NamedShardings of the params under (mesh, plan), default this role's own."""
    return model.param_shardings(self.model_cfg, mesh or self.mesh,
                                 sharding.plan_rules(plan or self.plan), self.head)

  def with_params(self, params: Any) -> Role:
    return dataclasses.replace(self, params=params)


def spec(name: str, model_cfg: ModelConfig, mesh, *, head: str = "lm",
         plan: str = sharding.DEFAULT_PLAN, trainable: bool = True) -> Role:
  """A role whose parameters are not loaded yet (params None): its graphdef and shardings."""
  graphdef, _ = model.abstract_model(model_cfg, head, sharding.plan_rules(plan))
  return Role(name, head, model_cfg, graphdef, None, mesh, plan, trainable)


def create(name: str, model_cfg: ModelConfig, mesh, *, head: str = "lm",
           plan: str = sharding.DEFAULT_PLAN, seed: int = 0, trainable: bool = True) -> Role:
  """A freshly initialised model, every parameter created on its sharding."""
  graphdef, params = model.create(model_cfg, mesh, sharding.plan_rules(plan), seed=seed,
                                  head=head)
  return Role(name, head, model_cfg, graphdef, params, mesh, plan, trainable)


def load(name: str, directory: str, mesh, *, head: str | None = None,
         plan: str = sharding.DEFAULT_PLAN, trainable: bool = False, dtype: str | None = None,
         seed: int = 0, step: int | None = None) -> Role:
  """A model directory restored onto (mesh, plan).

  Args:
    head: the head to use; None keeps the saved one. Another head swaps it (module docstring).
    dtype: e.g. "bfloat16" to keep a frozen role's parameters in half the memory.
    seed: initialises a swapped-in `lm` output projection.
  """
  model_cfg, saved_head = checkpoints.read_model_info(directory)
  rules = sharding.plan_rules(plan)
  _, _, _, params = checkpoints.load_model(directory, mesh, rules, step)
  head = head or saved_head
  if head not in model.HEADS:
    raise ValueError(f"role {name!r}: unknown head {head!r}; choose one of {sorted(model.HEADS)}")
  if head != saved_head:
    params = swap_head(params, model_cfg, mesh, rules, saved_head, head, seed)
  if dtype is not None:
    params = cast(params, dtype)
  graphdef, _ = model.abstract_model(model_cfg, head, rules)
  return Role(name, head, model_cfg, graphdef, params, mesh, plan, trainable)


def swap_head(params: Any, model_cfg: ModelConfig, mesh, rules: sharding.Rules, old: str,
              new: str, seed: int = 0) -> Any:
  """The backbone of `params` with `old`'s head parameter replaced by a new `new` head."""
  backbone = {k: v for k, v in params.items() if k != model.HEAD_PARAMS[old]}
  backbone[model.HEAD_PARAMS[new]] = model.init_head(model_cfg, mesh, rules, head=new, seed=seed)
  return backbone


def cast(params: Any, dtype: str) -> Any:
  """Params in `dtype` (floating leaves only), each on its own sharding."""
  target = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


def move(role: Role, mesh, plan: str, *, out: Role | None = None, donate: bool = False) -> Role:
  """The role on (mesh, plan): its params moved layer by layer (lm/reshard.py), the graphdef
  rebuilt with the new plan. `out`, a previous result, has its buffers reused."""
  if mesh is role.mesh and plan == role.plan:
    return role
  params = reshard.reshard(role.params, role.param_shardings(mesh, plan),
                           out=None if out is None else out.params, donate=donate)
  graphdef, _ = model.abstract_model(role.model_cfg, role.head, sharding.plan_rules(plan))
  return dataclasses.replace(role, graphdef=graphdef, params=params, mesh=mesh, plan=plan)


GENERATION_DTYPES = ("", "float32", "bfloat16")


def in_dtype(role: Role, dtype: str) -> Role:
  """`role` computing in `dtype`, its floating params a cast copy ("" returns `role` itself).

  For generation, which reads every weight at every decode step: bf16 weights halve the bytes
  read, and the KV cache follows the compute dtype. Training state stays in its own dtype.
  A bf16 copy on CPU also stores its projection weights [out, in] (`generation_layout`).
  """
  if dtype not in GENERATION_DTYPES:
    raise ValueError(f"role {role.name!r}: rollout_dtype {dtype!r} must be one of "
                     f"{GENERATION_DTYPES} (\"\" keeps the model's own)")
  if not dtype:
    return role
  layout = generation_layout(dtype, role.params)
  model_cfg = role.model_cfg.replace(compute_dtype=dtype, weight_layout=layout)
  graphdef, _ = model.abstract_model(model_cfg, role.head, role.rules)
  params = projection.relayout(cast(role.params, dtype), role.model_cfg.weight_layout, layout)
  return dataclasses.replace(role, model_cfg=model_cfg, graphdef=graphdef, params=params)


def generation_layout(dtype: str, params: Any) -> str:
  """The weight layout of a generation copy in `dtype` of `params` (lm/projection.py): "out_in"
  for bf16 on CPU devices, where it ran 1.1x faster (its fp32 products ran slower so), else
  "in_out"."""
  on_cpu = all(d.platform == "cpu" for d in jax.tree.leaves(params)[0].devices())
  return "out_in" if dtype == "bfloat16" and on_cpu else "in_out"
