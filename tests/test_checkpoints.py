"""Checkpoints: save on one mesh, restore onto another; model directories; the `lm sample` verb."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import checkpoints, configs, model, sharding

CFG = configs.get_preset("tiny")


def test_save_on_one_mesh_restore_on_another(tmp_path):
  fsdp = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
  graphdef, params = model.create(CFG, fsdp, seed=5)
  checkpoints.save_model(tmp_path, params, CFG)
  tensor = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
  cfg, head, _, restored = checkpoints.load_model(tmp_path, mesh=tensor)
  assert cfg == CFG and head == "lm"
  expected_shardings = model.param_shardings(CFG, tensor)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, params)
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(a.sharding)),
               restored, expected_shardings)


def test_model_directory_errors_say_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="model.json is missing"):
    checkpoints.load_model(tmp_path)
  checkpoints.write_model_info(tmp_path, CFG)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    checkpoints.load_model(tmp_path)
  (tmp_path / "model.json").write_text(json.dumps({"model": {"dimm": 3}}))
  with pytest.raises(ValueError, match="unknown ModelConfig fields"):
    checkpoints.read_model_info(tmp_path)
  # A generation copy's [out, in] weights (roles.in_dtype on CPU) are never saved as a model.
  with pytest.raises(ValueError, match="generation copy's .weight_layout='out_in'"):
    checkpoints.write_model_info(tmp_path / "copy", CFG.replace(weight_layout="out_in"))
  assert not (tmp_path / "copy").exists()


def test_interrupted_save_is_not_a_checkpoint(tmp_path):
  graphdef, params = model.create(CFG)
  checkpoints.save_model(tmp_path, params, CFG, step=1)
  # What a crash mid-save leaves behind: Orbax's temporary directory for step 2.
  partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123"
  partial.mkdir()
  (partial / "junk").write_text("half")
  manager = checkpoints.Manager(tmp_path)
  assert manager.latest_step() == 1


def test_lm_sample_from_a_saved_checkpoint(tmp_path):
  graphdef, params = model.create(CFG, seed=2)
  checkpoints.save_model(tmp_path, params, CFG)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "lm.cli", "sample", f"--checkpoint={tmp_path}",
       "--prompt_ids=1,5,9", "--temperature=0", "--max_new_tokens=5"],
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("output ids:")][0]
  produced = json.loads(line.split(":", 1)[1])
  # The same tokens as greedy decoding in this process.
  from lm import sampling
  expected = sampling.generate(graphdef, CFG, params, *sampling.left_pad([[1, 5, 9]]),
                               jax.random.key(0),
                               sampling.SamplingConfig(temperature=0.0, max_new_tokens=5))
  assert produced == expected.tokens[0, :int(expected.lengths[0])].tolist()


def test_lm_sample_rejects_bad_requests():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-m", "lm.cli", "sample", "--preset=tiny",
                           "--prompt_ids=1,x"], capture_output=True, text=True, env=env)
  assert result.returncode != 0 and "must be comma-separated integers" in result.stderr
  result = subprocess.run([sys.executable, "-m", "lm.cli", "sample", "--preset=tiny",
                           "--prompt_ids=1,999"], capture_output=True, text=True, env=env)
  assert result.returncode != 0 and "outside the vocabulary" in result.stderr


def test_lm_keeps_compiled_programs_between_processes(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  # Every program counts here (JAX caches only those that took a second to compile by default).
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", HOME=str(tmp_path),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cache = tmp_path / ".cache" / "lm" / "jax"
  command = [sys.executable, "-m", "lm.cli", "sample", "--preset=tiny", "--prompt_ids=1,5",
             "--max_new_tokens=3"]
  outputs, listings = [], []
  for _ in range(2):
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append(result.stdout)
    listings.append(sorted(p.name for p in cache.iterdir()))
  # The first process filled the cache, the second found every program in it.
  assert listings[0] and listings[1] == listings[0]
  assert outputs[0] == outputs[1]
