"""Sharding plans: golden PartitionSpecs for the paper's sizes, rules, meshes.

The golden files pin where every parameter of 7B and 70B lives on real slice shapes; a change to
the rules or the model's logical names shows up here as a diff. Regenerate with
`python tests/test_sharding.py --regenerate` after an intended change.
"""

import json
import os
import sys

import jax
import pytest

from lm import configs, model, sharding

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
PLANS = {
    "7b_fsdp64_tensor1": ("7b", (1, 1, 64, 1), sharding.DEFAULT_RULES),
    "70b_fsdp64_tensor4": ("70b", (1, 1, 64, 4), sharding.DEFAULT_RULES),
    "70b_rollout_data16_tensor8": ("70b", (1, 16, 1, 8), sharding.ROLLOUT_RULES),
}


def specs(plan: str) -> dict:
  preset, shape, rules = PLANS[plan]
  mesh = jax.sharding.AbstractMesh(shape, sharding.MESH_AXES)
  tree = model.param_specs(configs.PRESETS[preset], mesh, rules)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  return {"/".join(k.key for k in path): [list(a) if isinstance(a, tuple) else a for a in spec]
          for path, spec in flat}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_sharding_plan_matches_golden(plan):
  with open(os.path.join(GOLDEN, f"sharding_{plan}.json")) as f:
    assert specs(plan) == json.load(f)


def test_fsdp_shards_every_large_parameter_of_70b():
  plan = specs("70b_fsdp64_tensor4")
  for name in ("tok_embeddings", "output", "layers/attention/wq", "layers/feed_forward/w1"):
    assert "fsdp" in json.dumps(plan[name]) and "tensor" in json.dumps(plan[name]), name


def test_axes_that_do_not_divide_are_dropped_not_errors():
  mesh = jax.sharding.AbstractMesh((1, 1, 1, 8), sharding.MESH_AXES)
  # 70B has 8 KV heads: split 8 ways. A 2-KV-head model is replicated on that axis instead.
  assert sharding.logical_to_spec(("kv_heads",), sharding.DEFAULT_RULES, mesh, (8,))[0] == "tensor"
  assert sharding.logical_to_spec(("kv_heads",), sharding.DEFAULT_RULES, mesh, (2,))[0] is None
  with pytest.raises(KeyError, match="no sharding rule"):
    sharding.logical_to_spec(("heads_typo",), sharding.DEFAULT_RULES, mesh, (8,))


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.MeshConfig(data=-1, fsdp=-1).shape(8)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.MeshConfig(data=2, fsdp=8).shape(8)
  assert sharding.MeshConfig(data=2, tensor=2).shape(8) == (1, 2, 2, 2)


if __name__ == "__main__" and "--regenerate" in sys.argv:
  for plan in PLANS:
    with open(os.path.join(GOLDEN, f"sharding_{plan}.json"), "w") as f:
      json.dump(specs(plan), f, indent=1, sort_keys=True)
      f.write("\n")


def test_plans_are_chosen_by_name():
  assert sharding.plan_rules("fsdp_tp") == sharding.DEFAULT_RULES
  mesh = jax.sharding.AbstractMesh((1, 1, 16, 4), sharding.MESH_AXES)
  fsdp = model.param_specs(configs.PRESETS["70b"], mesh, sharding.plan_rules("fsdp"))
  rollout = model.param_specs(configs.PRESETS["70b"], mesh, sharding.plan_rules("rollout"))
  flat = lambda tree: json.dumps(jax.tree.map(tuple, tree))  # noqa: E731
  assert "tensor" not in flat(fsdp) and "fsdp" in flat(fsdp)
  assert "fsdp" not in flat(rollout) and "tensor" in flat(rollout)
  with pytest.raises(ValueError, match="unknown sharding plan 'zero3'"):
    sharding.plan_rules("zero3")


def test_a_model_keeps_its_plan_in_its_graphdef():
  """The plan is part of the jit cache key: models split under two plans are two graphdefs."""
  cfg = configs.get_preset("tiny")
  train, _ = model.abstract_model(cfg, "lm", sharding.plan_rules("fsdp_tp"))
  rollout, _ = model.abstract_model(cfg, "lm", sharding.plan_rules("rollout"))
  again, _ = model.abstract_model(cfg, "lm", sharding.plan_rules("fsdp_tp"))
  assert train != rollout and train == again and hash(train) == hash(again)
