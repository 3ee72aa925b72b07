"""Weight layouts: Hugging Face Llama tensors <-> our parameters.

Our parameters (see lm/model.py) are stacked over layers and store projections as [in, heads, head
dim] or [in, out]; PyTorch `Linear` stores [out, in]. Both we and Hugging Face use the rotate-half
RoPE layout, so no permutation is needed between the two (Meta's interleaved layout is permuted
on import by `meta_to_hf_qk`).

Every mapping is one tensor at a time, so a converter can stream a checkpoint tensor by tensor.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from lm.configs import ModelConfig

# (HF name pattern, our path) for the tensors of one layer; `{i}` is the layer index.
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": ("attention", "wq"),
    "self_attn.k_proj.weight": ("attention", "wk"),
    "self_attn.v_proj.weight": ("attention", "wv"),
    "self_attn.o_proj.weight": ("attention", "wo"),
    "mlp.gate_proj.weight": ("feed_forward", "w1"),
    "mlp.up_proj.weight": ("feed_forward", "w3"),
    "mlp.down_proj.weight": ("feed_forward", "w2"),
    "input_layernorm.weight": ("attention_norm", "weight"),
    "post_attention_layernorm.weight": ("ffn_norm", "weight"),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("tok_embeddings",),
    "model.norm.weight": ("norm", "weight"),
    "lm_head.weight": ("output",),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
  """Every tensor name of a Hugging Face `LlamaForCausalLM` with this shape."""
  names = list(_GLOBAL_TENSORS)
  for i in range(cfg.n_layers):
    names += [f"model.layers.{i}.{suffix}" for suffix in _LAYER_TENSORS]
  return names


def hf_to_ours(name: str, tensor: np.ndarray, cfg: ModelConfig) -> tuple[tuple[str, ...], int | None, np.ndarray]:
  """Maps one HF tensor to (our path, layer index or None, array in our layout).

  Raises ValueError naming the tensor when the name is unknown or its shape is not what `cfg`
  implies.
  """
  d, n, k, h, f, v = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size
  match = _LAYER_NAME.fullmatch(name)
  if match:
    layer, suffix = int(match.group(1)), match.group(2)
    if suffix not in _LAYER_TENSORS or layer >= cfg.n_layers:
      raise ValueError(f"unexpected tensor {name!r} for a {cfg.n_layers}-layer model")
    path = ("layers",) + _LAYER_TENSORS[suffix]
  elif name in _GLOBAL_TENSORS:
    layer, suffix, path = None, name, _GLOBAL_TENSORS[name]
  else:
    raise ValueError(f"unexpected tensor {name!r}")
  expected_hf_shape = {
      "self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (k * h, d),
      "self_attn.v_proj.weight": (k * h, d), "self_attn.o_proj.weight": (d, n * h),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
      "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
  }[suffix]
  if tuple(tensor.shape) != expected_hf_shape:
    raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                     f"{expected_hf_shape} for this config")
  ours = {
      "self_attn.q_proj.weight": lambda t: t.T.reshape(d, n, h),
      "self_attn.k_proj.weight": lambda t: t.T.reshape(d, k, h),
      "self_attn.v_proj.weight": lambda t: t.T.reshape(d, k, h),
      "self_attn.o_proj.weight": lambda t: t.T.reshape(n, h, d),
      "mlp.gate_proj.weight": lambda t: t.T, "mlp.up_proj.weight": lambda t: t.T,
      "mlp.down_proj.weight": lambda t: t.T, "lm_head.weight": lambda t: t.T,
  }.get(suffix, lambda t: t)(tensor)
  return path, layer, np.ascontiguousarray(ours)


def ours_to_hf(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in HF layout) for every tensor of our params, one at a time."""
  d, n, k, h = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  to_hf = {
      ("attention", "wq"): lambda a: a.reshape(d, n * h).T,
      ("attention", "wk"): lambda a: a.reshape(d, k * h).T,
      ("attention", "wv"): lambda a: a.reshape(d, k * h).T,
      ("attention", "wo"): lambda a: a.reshape(n * h, d).T,
      ("feed_forward", "w1"): lambda a: a.T, ("feed_forward", "w3"): lambda a: a.T,
      ("feed_forward", "w2"): lambda a: a.T,
  }
  for name, path in _GLOBAL_TENSORS.items():
    array = np.asarray(_get(params, path))
    yield name, np.ascontiguousarray(array.T if name == "lm_head.weight" else array)
  for i in range(cfg.n_layers):
    for suffix, path in _LAYER_TENSORS.items():
      array = np.asarray(_get(params, ("layers",) + path)[i])
      yield f"model.layers.{i}.{suffix}", np.ascontiguousarray(to_hf.get(path, lambda a: a)(array))


def params_from_hf(state_dict: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """A whole HF state dict (name -> array) -> our params (nested dict of numpy arrays).

  Missing or extra tensors are an error that names them.
  """
  expected = set(hf_tensor_names(cfg))
  missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
  if missing or extra:
    raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}")
  params: dict = {}
  stacks: dict[tuple[str, ...], list] = {}
  for name, tensor in state_dict.items():
    path, layer, array = hf_to_ours(name, np.asarray(tensor), cfg)
    if layer is None:
      _set(params, path, array)
    else:
      stacks.setdefault(path, [None] * cfg.n_layers)[layer] = array
  for path, layers in stacks.items():
    _set(params, path, np.stack(layers))
  return params


def meta_to_hf_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Permutes Meta's interleaved-RoPE wq/wk rows [n*H, D] into the rotate-half layout.

  Within each head, Meta pairs rows (2i, 2i+1); rotate-half pairs (i, i + H/2).
  """
  out_dim, in_dim = weight.shape
  head_dim = out_dim // n_heads
  return (weight.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(0, 2, 1, 3)
          .reshape(out_dim, in_dim))


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
