"""Checkpoints: Orbax managers that save asynchronously and restore onto any mesh.

A model directory, whether written by a training stage, by `lm convert`, or by hand, looks like:

  DIR/model.json            the ModelConfig and the head ("lm" or "scalar")
  DIR/tokenizer.model       the SentencePiece model, when there is one
  DIR/checkpoints/<step>/   Orbax items: `params`, and for training runs `opt_state`, `extra`
                            (step, RNG) and `data` (the input iterator's state, JSON)

Orbax writes each step to a temporary directory and renames it when complete, and `model.json`
is written with an atomic rename, so an interrupted save never leaves a checkpoint that looks
whole. Restoring takes abstract arrays carrying shardings, so a checkpoint saved on one mesh
restores onto any other (each process reads only the shards it needs).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from lm import model as model_lib
from lm import sharding
from lm.configs import ModelConfig

MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoints"


def write_atomically(path: str | os.PathLike, text: str) -> None:
  """Writes text so readers see either the old file or the whole new one, never a part."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_model_info(directory: str | os.PathLike, cfg: ModelConfig, head: str = "lm",
                     tokenizer_path: str | os.PathLike | None = None) -> None:
  """Writes DIR/model.json (and copies the tokenizer in) so the directory is self-describing."""
  if cfg.weight_layout != "in_out":
    # Conversion, export and every loader read model directories in Meta's [in, out] layout.
    raise ValueError(f"{directory}: a model directory holds [in, out] weights; this config is a "
                     f"generation copy's (weight_layout={cfg.weight_layout!r}): save the model "
                     "it was made from")
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() != 0:
    return
  write_atomically(os.path.join(directory, MODEL_FILE),
                   json.dumps({"head": head, "model": cfg.to_dict()}, indent=2) + "\n")
  if tokenizer_path is not None:
    target = os.path.join(directory, TOKENIZER_FILE)
    if os.path.abspath(tokenizer_path) != os.path.abspath(target):
      shutil.copyfile(tokenizer_path, target + ".tmp")
      os.replace(target + ".tmp", target)


def read_model_info(directory: str | os.PathLike) -> tuple[ModelConfig, str]:
  """(ModelConfig, head) of a model directory, with an error that says what is missing."""
  path = os.path.join(directory, MODEL_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a model directory: {MODEL_FILE} is missing")
  try:
    info = json.loads(open(path).read())
    return ModelConfig.from_dict(info["model"]), info.get("head", "lm")
  except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a valid model description ({e})") from e


class Manager:
  """Saves and restores training state under DIR/checkpoints with a keep policy.

  Items: `params` (required), `opt_state` and `extra` (any pytrees), and `data` (a JSON-able dict).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    self.directory = epath.Path(directory) / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, params, opt_state=None, extra=None, data: dict | None = None,
           force: bool = False) -> bool:
    items = {"params": ocp.args.StandardSave(params)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if extra is not None:
      items["extra"] = ocp.args.StandardSave(extra)
    if data is not None:
      items["data"] = ocp.args.JsonSave(data)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, params, opt_state=None, extra=None, data: bool = False) -> dict:
    """Restores the named items; each abstract tree (ShapeDtypeStructs with shardings) says
    where every array goes."""
    items = {"params": ocp.args.StandardRestore(params)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(opt_state)
    if extra is not None:
      items["extra"] = ocp.args.StandardRestore(extra)
    if data:
      items["data"] = ocp.args.JsonRestore()
    return dict(self._manager.restore(step, args=ocp.args.Composite(**items)).items())

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_model(directory: str | os.PathLike, params, cfg: ModelConfig, *, head: str = "lm",
               tokenizer_path: str | os.PathLike | None = None, step: int = 0) -> None:
  """Writes a standalone model directory (model.json, tokenizer, params at `step`)."""
  write_model_info(directory, cfg, head, tokenizer_path)
  manager = Manager(directory, max_to_keep=None, async_save=False)
  manager.save(step, params, force=True)
  manager.wait()
  manager.close()


def load_model(directory: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
               rules: sharding.Rules = sharding.DEFAULT_RULES, step: int | None = None,
               ) -> tuple[ModelConfig, str, Any, Any]:
  """Restores a model directory onto `mesh` (default: one device), laid out by `rules`.

  Returns (ModelConfig, head, graphdef, params); the graphdef carries `rules` (see lm/roles.py
  for loading with another head or plan).
  """
  cfg, head = read_model_info(directory)
  manager = Manager(directory, async_save=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no complete checkpoint under {CHECKPOINT_DIR}/")
  if mesh is None:
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  graphdef, _ = model_lib.abstract_model(cfg, head, rules)
  target = model_lib.abstract_params(cfg, mesh, rules, head)
  params = manager.restore(step, target)["params"]
  manager.close()
  logging.info("restored %s step %d", directory, step)
  return cfg, head, graphdef, params
