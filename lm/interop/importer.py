"""A Meta or Hugging Face checkpoint -> our model directory (`lm convert`).

The output is what every stage writes: model.json, tokenizer.model and an Orbax checkpoint at
step 0, so it works as `init_from` and with `lm sample --checkpoint`. Each of our parameters is
written layer by layer from the source tensor that feeds it (lm/interop/streaming.py); the
layout change is a view of that tensor, copied out a storage chunk at a time, so the host holds
about one source tensor at a time.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from lm import checkpoints, convert, model
from lm.configs import ModelConfig
from lm.interop import output, sources, streaming


def _param_paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], tuple]]:
  leaves = []
  for key, value in tree.items():
    if isinstance(value, dict):
      leaves += _param_paths(value, prefix + (key,))
    else:
      leaves.append((prefix + (key,), tuple(value.shape)))
  return leaves


def streamed_params(source: sources.Source, cfg: ModelConfig) -> dict:
  """Our params tree with a StreamedArray per leaf, each reading its tensors from `source`."""
  dtype = np.dtype(cfg.param_dtype)
  names = {convert.our_path(name, cfg): name for name in convert.hf_tensor_names(cfg)}

  def ours(path, layer):
    name = names[(path, layer)]
    # A view of the source tensor: the writer copies it out a storage chunk at a time.
    got_path, got_layer, array = convert.hf_to_ours(name, source.read(name), cfg, contiguous=False)
    assert (got_path, got_layer) == (path, layer), (name, got_path, got_layer)
    return array

  tree: dict = {}
  for path, shape in _param_paths(model.abstract_params(cfg)):
    if path[0] == "layers":
      leaf = streaming.stacked(shape, dtype, lambda i, path=path: ours(path, i))
    else:
      leaf = streaming.whole(shape, dtype, lambda path=path: ours(path, None))
    convert._set(tree, path, leaf)
  return tree


def import_checkpoint(source: sources.Source, dst: str | os.PathLike, *,
                      overwrite: bool = False) -> ModelConfig:
  """Writes `source` as our model directory at `dst`, atomically; returns its ModelConfig.

  The source's ModelConfig (with any overrides it was opened with) is written as model.json, and
  parameters are cast to its `param_dtype`.
  """
  cfg = source.cfg
  start = time.time()
  with output.atomic_directory(dst, overwrite) as tmp:
    # model.json first is safe: the directory only gets its final name once the params are whole.
    checkpoints.write_model_info(tmp, cfg, "lm", source.tokenizer_path)
    streaming.save(tmp, streamed_params(source, cfg))
  source.close()
  logging.info("converted %s -> %s in %.1fs", source.directory, dst, time.time() - start)
  return cfg
