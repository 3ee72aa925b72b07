"""Meta and Hugging Face checkpoint directories, read one tensor at a time.

Both sources present the same view: a `ModelConfig`, the tokenizer file, the HF name and shape of
every tensor (known before any data is read, so a wrong checkpoint fails before anything is
written), and `read(name)`, which returns one tensor in HF layout. Meta tensors are merged across
model-parallel shards and their Q/K rows permuted on the way (lm/convert.py holds the tables).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import numpy as np
from absl import logging

from lm import convert
from lm.configs import ModelConfig
from lm.interop import safetensors_io

LLAMA2_NORM_EPS = 1e-5
# Meta's params.json has no context length; Llama 2 trained at 4096 for every size (LLAMA2.md §1.1).
LLAMA2_CONTEXT = 4096


class Source:
  """A checkpoint directory as HF-named tensors. Subclasses fill `cfg`, `tokenizer_path`,
  `shapes` and `where` (name -> file, for messages) and implement `_read`."""

  cfg: ModelConfig
  tokenizer_path: str | None
  shapes: dict[str, tuple[int, ...]]
  where: dict[str, str]

  def read(self, name: str) -> np.ndarray:
    """Tensor `name` in HF layout [out, in], as stored (no dtype change)."""
    array = self._read(name)
    if tuple(array.shape) != self.shapes[name]:
      raise ValueError(f"{self.where[name]}: tensor {name!r} has shape {tuple(array.shape)}, its "
                       f"header said {self.shapes[name]}")
    return array

  def _read(self, name: str) -> np.ndarray:
    raise NotImplementedError

  def check(self, config_file: str) -> None:
    """Missing or extra tensors, and shapes against the config: errors naming the tensor."""
    expected = convert.hf_tensor_names(self.cfg)
    missing = [n for n in expected if n not in self.shapes]
    extra = sorted(set(self.shapes) - set(expected))
    if missing or extra:
      raise ValueError(
          f"{self.directory}: tensors do not match {config_file} ({self.cfg.n_layers} layers): "
          f"missing {_first(missing)}, unexpected {_first(extra)}")
    for name in expected:
      want = convert.hf_shape(name, self.cfg)
      if self.shapes[name] != want:
        raise ValueError(f"{self.where[name]}: tensor {name!r} has shape {self.shapes[name]}, "
                         f"{config_file} implies {want}")

  def close(self) -> None:
    pass


def _first(names: list[str], n: int = 6) -> list[str] | str:
  return names if len(names) <= n else f"{names[:n]} and {len(names) - n} more"


def _tokenizer(directory: str) -> str | None:
  path = os.path.join(directory, "tokenizer.model")
  return path if os.path.exists(path) else None


def _check_tokenizer(path: str | None, vocab_size: int, where: str) -> None:
  if path is None:
    logging.warning("%s has no tokenizer.model (SentencePiece); the converted model will need "
                    "--tokenizer or --prompt_ids to sample", where)
    return
  import sentencepiece
  pieces = sentencepiece.SentencePieceProcessor(model_file=path).vocab_size()
  if pieces > vocab_size:
    raise ValueError(f"{path} has {pieces} pieces but the embedding has {vocab_size} rows "
                     f"(model.embed_tokens.weight [{vocab_size}, D]); token ids would overflow it")


def eps_warning(cfg: ModelConfig, config_file: str) -> str | None:
  """A warning when the RMSNorm eps is not Llama 2's 1e-5 (the rms_norm_eps 1e-6 trap, §1.5).

  The file's value is kept (it is what the weights were trained or exported with); the caller
  shows the warning, and `--norm_eps` overrides it.
  """
  if cfg.norm_eps == LLAMA2_NORM_EPS:
    return None
  return (f"{config_file} sets the RMSNorm eps to {cfg.norm_eps:g}; every Llama 2 size uses 1e-5 "
          f"(Hugging Face's Llama-2 config.json shipped 1e-6 for a while, LLAMA2.md §1.5). Kept "
          f"as is; pass --norm_eps=1e-5 if these are Llama 2 weights.")


# --- Hugging Face ---------------------------------------------------------------------------

def config_from_hf(config: dict[str, Any], where: str, **overrides) -> ModelConfig:
  """A ModelConfig from a Hugging Face Llama config.json (v4 `rope_theta` or v5 `rope_parameters`)."""
  if config.get("model_type", "llama") != "llama":
    raise ValueError(f"{where}: model_type {config.get('model_type')!r} is not 'llama'")
  problems = []
  if config.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={config['hidden_act']!r} (Llama uses silu)")
  for key in ("attention_bias", "mlp_bias"):
    if config.get(key):
      problems.append(f"{key}=true (Llama has no biases)")
  rope = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  for table in (rope, scaling):
    if table.get("rope_type", table.get("type", "default")) != "default":
      problems.append(f"RoPE scaling {table} (only plain RoPE is implemented)")
  if problems:
    raise ValueError(f"{where}: unsupported: " + "; ".join(problems))
  try:
    dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if config.get("head_dim") not in (None, dim // n_heads):
      raise ValueError(f"{where}: head_dim={config['head_dim']} differs from hidden_size / "
                       f"num_attention_heads = {dim // n_heads}")
    values = dict(
        vocab_size=int(config["vocab_size"]), dim=dim, n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        ffn_dim=int(config["intermediate_size"]),
        norm_eps=float(config.get("rms_norm_eps", LLAMA2_NORM_EPS)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        max_seq_len=int(config.get("max_position_embeddings", LLAMA2_CONTEXT)),
    )
  except KeyError as e:
    raise ValueError(f"{where}: missing key {e}") from e
  values.update({k: v for k, v in overrides.items() if v is not None})
  return ModelConfig(**values)


class HFSource(Source):
  """A Hugging Face directory: config.json, model*.safetensors (+ optional index), tokenizer."""

  def __init__(self, directory: str, **overrides):
    self.directory = directory
    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
      raise FileNotFoundError(f"{directory}: no config.json (is this a Hugging Face directory?)")
    config = json.loads(open(config_file).read())
    self.cfg = config_from_hf(config, config_file, **overrides)
    self.infos = self._index(directory)
    if "lm_head.weight" not in self.infos and config.get("tie_word_embeddings"):
      self.infos["lm_head.weight"] = self.infos.get("model.embed_tokens.weight")
    self.shapes = {n: i.shape for n, i in self.infos.items() if i is not None}
    self.where = {n: i.path for n, i in self.infos.items() if i is not None}
    self.check("config.json")
    self.tokenizer_path = _tokenizer(directory)
    _check_tokenizer(self.tokenizer_path, self.cfg.vocab_size, directory)

  @staticmethod
  def _index(directory: str) -> dict[str, safetensors_io.TensorInfo]:
    index_file = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_file):
      weight_map = json.loads(open(index_file).read())["weight_map"]
      headers = {f: safetensors_io.read_header(os.path.join(directory, f))
                 for f in sorted(set(weight_map.values()))}
      infos = {}
      for name, file in weight_map.items():
        if name not in headers[file]:
          raise ValueError(f"{index_file} places tensor {name!r} in {file}, which does not hold it")
        infos[name] = headers[file][name]
      return infos
    files = sorted(glob.glob(os.path.join(directory, "model*.safetensors")))
    if not files:
      pickles = glob.glob(os.path.join(directory, "pytorch_model*.bin"))
      raise FileNotFoundError(
          f"{directory}: no model*.safetensors" + (
              " (pytorch_model*.bin pickles are not read; save the model with "
              "safe_serialization=True)" if pickles else ""))
    infos = {}
    for file in files:
      for name, info in safetensors_io.read_header(file).items():
        if name in infos:
          raise ValueError(f"tensor {name!r} is in both {infos[name].path} and {file}")
        infos[name] = info
    return infos

  def _read(self, name: str) -> np.ndarray:
    return safetensors_io.read_tensor(self.infos[name])


# --- Meta -----------------------------------------------------------------------------------

def config_from_meta(params: dict[str, Any], vocab_size: int, where: str, **overrides) -> ModelConfig:
  """A ModelConfig from Meta's params.json; `vocab_size` comes from the embedding (params.json
  has -1, meaning "ask the tokenizer")."""
  if params.get("use_scaled_rope"):
    raise ValueError(f"{where}: use_scaled_rope (Llama 3.1 RoPE scaling) is not implemented")
  declared = params.get("vocab_size", -1)
  if declared not in (-1, None) and declared != vocab_size:
    raise ValueError(f"{where}: vocab_size={declared}, but tensor 'tok_embeddings.weight' has "
                     f"{vocab_size} rows")
  try:
    values = dict(
        vocab_size=vocab_size, dim=int(params["dim"]), n_layers=int(params["n_layers"]),
        n_heads=int(params["n_heads"]), n_kv_heads=params.get("n_kv_heads"),
        multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=float(params.get("norm_eps", LLAMA2_NORM_EPS)),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_seq_len=int(params.get("max_seq_len", LLAMA2_CONTEXT)),
    )
  except KeyError as e:
    raise ValueError(f"{where}: missing key {e}") from e
  values.update({k: v for k, v in overrides.items() if v is not None})
  return ModelConfig(**values)


def load_pth(path: str) -> dict[str, Any]:
  """A consolidated.NN.pth as {name: torch.Tensor}, memory-mapped (nothing is read yet).

  Only PyTorch's weights-only unpickler runs, so no code in the file executes; a file holding
  anything but a flat dict of tensors is refused with an error naming it.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading Meta .pth checkpoints needs PyTorch: pip install -e \".[convert]\"") from e
  import pickle
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: refused: not a plain weights-only PyTorch checkpoint "
                     f"({first_line})") from e
  if not isinstance(state, dict):
    raise ValueError(f"{path}: refused: holds a {type(state).__name__}, not a dict of tensors")
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: refused: entry {key!r} is a {type(value).__name__}, not a tensor")
  return state


def _to_numpy(tensor) -> np.ndarray:
  import torch
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class MetaSource(Source):
  """A Meta directory: consolidated.NN.pth (model-parallel shards), params.json, tokenizer.model.

  Shards are memory-mapped, and mapped pages count towards the resident set for as long as the
  file stays mapped, so every read maps the shards afresh and lets go of them afterwards: a
  tensor's pages stay resident only while the tensor itself is in use.
  """

  def __init__(self, directory: str, **overrides):
    self.directory = directory
    params_file = os.path.join(directory, "params.json")
    if not os.path.exists(params_file):
      raise FileNotFoundError(f"{directory}: no params.json (is this a Meta checkpoint directory?)")
    params = json.loads(open(params_file).read())
    self.files = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
    numbers = [int(m.group(1)) for f in self.files
               if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", os.path.basename(f)))]
    if not self.files or numbers != list(range(len(self.files))):
      raise FileNotFoundError(f"{directory}: expected consolidated.00.pth ... consolidated.NN.pth, "
                              f"found {[os.path.basename(f) for f in self.files]}")
    states = [load_pth(f) for f in self.files]
    self._check_names(states, int(params["n_layers"]))
    vocab_size = tuple(states[0]["tok_embeddings.weight"].shape)[0]
    self.cfg = config_from_meta(params, vocab_size, params_file, **overrides)
    self.meta_names = convert.meta_tensor_names(self.cfg.n_layers)
    self.to_meta = {hf: (meta, axis) for meta, (hf, axis) in self.meta_names.items()}
    self.shapes, self.where = {}, {}
    for meta, (hf, axis) in self.meta_names.items():
      self.shapes[hf] = self._merged_shape(states, meta, axis)
      self.where[hf] = ", ".join(os.path.basename(f) for f in self.files) + f" ({meta})"
    del states
    self.check("params.json")
    self.tokenizer_path = _tokenizer(directory)
    _check_tokenizer(self.tokenizer_path, self.cfg.vocab_size, directory)

  def _check_names(self, states: list[dict], n_layers: int) -> None:
    expected = set(convert.meta_tensor_names(n_layers))
    for file, state in zip(self.files, states):
      names = set(state) - set(convert.META_IGNORED)
      missing, extra = sorted(expected - names), sorted(names - expected)
      if missing or extra:
        raise ValueError(f"{file}: tensors do not match params.json ({n_layers} layers): "
                         f"missing {_first(missing)}, unexpected {_first(extra)}")

  def _merged_shape(self, states: list[dict], meta: str, axis: int | None) -> tuple[int, ...]:
    shapes = [tuple(s[meta].shape) for s in states]
    if axis is None or len(shapes) == 1:
      if len(set(shapes)) > 1:
        raise ValueError(f"tensor {meta!r} should be a copy in every shard but has shapes "
                         f"{dict(zip(map(os.path.basename, self.files), shapes))}")
      return shapes[0]
    rest = {s[:axis] + s[axis + 1:] for s in shapes}
    if len(rest) > 1:
      raise ValueError(f"tensor {meta!r}: shards disagree off the concatenation axis {axis}: "
                       f"{dict(zip(map(os.path.basename, self.files), shapes))}")
    merged = list(shapes[0])
    merged[axis] = sum(s[axis] for s in shapes)
    return tuple(merged)

  def _read(self, name: str) -> np.ndarray:
    meta, axis = self.to_meta[name]
    if axis is None or len(self.files) == 1:
      # A view into the mapping (no copy); the file stays mapped as long as the array lives.
      merged = _to_numpy(load_pth(self.files[0])[meta])
    else:
      merged = None
      offset = 0
      for file in self.files:
        piece = _to_numpy(load_pth(file)[meta])
        if merged is None:  # Meta and HF shapes agree (HF only reorders Q/K rows)
          merged = np.empty(self.shapes[name], piece.dtype)
        index = (slice(None),) * axis + (slice(offset, offset + piece.shape[axis]),)
        merged[index] = piece
        offset += piece.shape[axis]
        del piece  # unmaps this shard before the next is mapped
    return convert.meta_to_hf(name, merged, self.cfg)


def open_source(kind: str, directory: str, **overrides) -> Source:
  """`kind` is "meta" or "hf"; overrides are ModelConfig fields (None = keep the file's value)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} is not a directory")
  if kind == "meta":
    return MetaSource(directory, **overrides)
  if kind == "hf":
    return HFSource(directory, **overrides)
  raise ValueError(f"unknown source format {kind!r}; choose 'meta' or 'hf'")
