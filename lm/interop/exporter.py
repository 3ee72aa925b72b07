"""Our model directory -> a Hugging Face Llama directory (`lm export --to hf`).

Writes config.json, generation_config.json, model.safetensors (or model-0000k-of-0000n.safetensors
with model.safetensors.index.json past `max_shard_bytes`) and the tokenizer, so that
`transformers.LlamaForCausalLM.from_pretrained(DST)` loads it. Tensors are read from the Orbax
checkpoint one layer at a time and written as they are converted.

A scalar-head model (reward or value model) exports its backbone only, as a `LlamaModel`: the
head has no Hugging Face causal-LM counterpart, so it is skipped and the caller is told.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from lm import checkpoints, convert, model
from lm.configs import ModelConfig
from lm.interop import output, safetensors_io, streaming


def hf_config(cfg: ModelConfig, dtype: np.dtype, head: str = "lm") -> dict:
  """config.json for transformers (v4's `rope_theta` and v5's `rope_parameters` both given)."""
  return {
      "architectures": ["LlamaForCausalLM" if head == "lm" else "LlamaModel"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.hidden_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      "initializer_range": cfg.init_std,
      "pretraining_tp": 1,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "torch_dtype": str(np.dtype(dtype)),
      "dtype": str(np.dtype(dtype)),
      "use_cache": True,
  }


def _tokenizer_files(tokenizer_model: str, directory: str) -> None:
  shutil.copyfile(tokenizer_model, os.path.join(directory, "tokenizer.model"))
  special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
  config = dict(special, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                legacy=True, model_max_length=1 << 30, clean_up_tokenization_spaces=False)
  for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
    with open(os.path.join(directory, name), "w") as f:
      json.dump(value, f, indent=2)


def _shards(specs: list, max_shard_bytes: int) -> list[list]:
  shards, size = [[]], 0
  for spec in specs:
    nbytes = math.prod(spec[2]) * np.dtype(spec[1]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


def export_hf(directory: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
              step: int | None = None) -> list[str]:
  """Writes our model directory as a Hugging Face Llama directory at `dst`, atomically.

  Args:
    dtype: the stored dtype ("float32", "bfloat16", "float16"); default: the model's param_dtype.
    max_shard_bytes: safetensors files are split past this size (with an index).
    step: the checkpoint step (default: the latest).

  Returns:
    Notes for the user (e.g. a skipped scalar head).
  """
  cfg, head = checkpoints.read_model_info(directory)
  dtype = np.dtype(dtype or cfg.param_dtype)
  reader = streaming.ParamReader(directory, step)
  notes = []
  names = convert.hf_tensor_names(cfg)
  if head != "lm":
    names = [n for n in names if n != "lm_head.weight"]
    notes.append(f"{directory} holds a {head!r}-head model: exported its backbone as a "
                 f"transformers LlamaModel (load with LlamaModel.from_pretrained); the {head} head "
                 f"`score` [{cfg.dim}] has no Hugging Face causal-LM counterpart and was skipped")
  specs = [(name, dtype, convert.hf_shape(name, cfg)) for name in names]
  abstract = model.abstract_params(cfg, head=head)
  for name in names:
    path, _ = convert.our_path(name, cfg)
    want, stored = tuple(convert._get(abstract, path).shape), reader.shape(path)
    if stored != want:
      raise ValueError(f"{directory}: param {'/'.join(path)} is stored with shape {stored}, "
                       f"model.json implies {want}")

  def arrays(shard):
    for name, _, _ in shard:
      path, layer = convert.our_path(name, cfg)
      hf = convert.our_layer_to_hf(path, reader.read(path, layer), cfg, contiguous=False)
      yield hf.astype(dtype, copy=False)

  shards = _shards(specs, max_shard_bytes)
  with output.atomic_directory(dst, overwrite) as tmp:
    if len(shards) == 1:
      files = ["model.safetensors"]
    else:
      files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, shard in zip(files, shards):
      safetensors_io.write(os.path.join(tmp, file), shard, arrays(shard))
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(math.prod(s) * d.itemsize for _, d, s in specs)},
               "weight_map": {name: file for file, shard in zip(files, shards)
                              for name, _, _ in shard}}
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config(cfg, dtype, head), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    tokenizer = os.path.join(directory, checkpoints.TOKENIZER_FILE)
    if os.path.exists(tokenizer):
      _tokenizer_files(tokenizer, tmp)
    else:
      notes.append(f"{directory} has no {checkpoints.TOKENIZER_FILE}; no tokenizer was exported")
  return notes
