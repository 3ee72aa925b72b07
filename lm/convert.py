"""Weight layouts: Meta and Hugging Face Llama tensors <-> our parameters.

Our parameters (see lm/model.py) are stacked over layers and store projections as [in, heads, head
dim] or [in, out]; PyTorch `Linear` stores [out, in]. Both we and Hugging Face use the rotate-half
RoPE layout, so no permutation is needed between the two. Meta's tensors are first mapped to
Hugging Face names and layout (`META_TENSORS`: shards concatenated on the axes of LLAMA2.md §1.4,
`meta_to_hf_qk` for the interleaved RoPE rows), so every source goes through one table.

Every mapping is one tensor at a time, so a converter can stream a checkpoint tensor by tensor
(lm/interop/ does).
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


def _split_name(name: str, cfg: ModelConfig) -> tuple[tuple[str, ...], int | None, str]:
  """HF name -> (our path, layer index or None, suffix keying the per-tensor tables)."""
  match = _LAYER_NAME.fullmatch(name)
  if match:
    layer, suffix = int(match.group(1)), match.group(2)
    if suffix not in _LAYER_TENSORS or layer >= cfg.n_layers:
      raise ValueError(f"unexpected tensor {name!r} for a {cfg.n_layers}-layer model")
    return ("layers",) + _LAYER_TENSORS[suffix], layer, suffix
  if name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[name], None, name
  raise ValueError(f"unexpected tensor {name!r}")


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
  """The shape `cfg` implies for the HF tensor `name` (PyTorch [out, in] for projections)."""
  d, n, k, h, f, v = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size
  return {
      "self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (k * h, d),
      "self_attn.v_proj.weight": (k * h, d), "self_attn.o_proj.weight": (d, n * h),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
      "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
  }[_split_name(name, cfg)[2]]


def hf_to_ours(name: str, tensor: np.ndarray, cfg: ModelConfig, contiguous: bool = True,
               ) -> tuple[tuple[str, ...], int | None, np.ndarray]:
  """Maps one HF tensor to (our path, layer index or None, array in our layout).

  With `contiguous=False` the array may be a transposed view of `tensor` (no copy), for writers
  that copy it out block by block.

  Raises ValueError naming the tensor when the name is unknown or its shape is not what `cfg`
  implies.
  """
  d, n, k, h = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  path, layer, suffix = _split_name(name, cfg)
  expected_hf_shape = hf_shape(name, cfg)
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
  return path, layer, np.ascontiguousarray(ours) if contiguous else ours


def ours_to_hf(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in HF layout) for every tensor of our params, one at a time."""
  for name in hf_tensor_names(cfg):
    path, layer = our_path(name, cfg)
    array = np.asarray(_get(params, path) if layer is None else _get(params, path)[layer])
    yield name, our_layer_to_hf(path, array, cfg)


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


def our_path(name: str, cfg: ModelConfig) -> tuple[tuple[str, ...], int | None]:
  """HF name -> (our param path, layer index or None)."""
  path, layer, _ = _split_name(name, cfg)
  return path, layer


def hf_name(path: tuple[str, ...], layer: int | None) -> str:
  """Our param path (and layer index for stacked params) -> the HF tensor name."""
  if layer is None:
    return {v: k for k, v in _GLOBAL_TENSORS.items()}[tuple(path)]
  suffix = {v: k for k, v in _LAYER_TENSORS.items()}[tuple(path[1:])]
  return f"model.layers.{layer}.{suffix}"


def our_layer_to_hf(path: tuple[str, ...], array: np.ndarray, cfg: ModelConfig,
                    contiguous: bool = True) -> np.ndarray:
  """One of our arrays (one layer's slice for stacked params) -> HF layout; C-contiguous unless
  `contiguous=False`, which may return a transposed view."""
  d, n, k, h = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
  to_hf = {
      ("layers", "attention", "wq"): lambda a: a.reshape(d, n * h).T,
      ("layers", "attention", "wk"): lambda a: a.reshape(d, k * h).T,
      ("layers", "attention", "wv"): lambda a: a.reshape(d, k * h).T,
      ("layers", "attention", "wo"): lambda a: a.reshape(n * h, d).T,
      ("layers", "feed_forward", "w1"): lambda a: a.T, ("layers", "feed_forward", "w3"): lambda a: a.T,
      ("layers", "feed_forward", "w2"): lambda a: a.T, ("output",): lambda a: a.T,
  }
  out = to_hf.get(tuple(path), lambda a: a)(array)
  return np.ascontiguousarray(out) if contiguous else out


# Meta tensor suffix -> (HF suffix, axis the model-parallel shards are concatenated on, or None for
# copies in every shard) (LLAMA2.md §1.4). Llama 2's ParallelEmbedding shards the embedding width.
META_LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
META_GLOBAL_TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
# Meta's checkpoints also carry the RoPE inverse frequencies, which we recompute from rope_theta.
META_IGNORED = ("rope.freqs",)


def meta_tensor_names(n_layers: int) -> dict[str, tuple[str, int | None]]:
  """Every Meta tensor name -> (HF name, shard concatenation axis or None)."""
  names = dict(META_GLOBAL_TENSORS)
  for i in range(n_layers):
    names.update({f"layers.{i}.{meta}": (f"model.layers.{i}.{hf}", axis)
                  for meta, (hf, axis) in META_LAYER_TENSORS.items()})
  return names


def meta_to_hf(hf: str, merged: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """A merged Meta tensor in HF layout: wq/wk rows permuted to rotate-half, the rest unchanged."""
  if hf.endswith("q_proj.weight"):
    return meta_to_hf_qk(merged, cfg.n_heads)
  if hf.endswith("k_proj.weight"):
    return meta_to_hf_qk(merged, cfg.kv_heads)
  return merged


def meta_to_hf_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Permutes Meta's interleaved-RoPE wq/wk rows [n*H, D] into the rotate-half layout.

  Within each head, Meta pairs rows (2i, 2i+1); rotate-half pairs (i, i + H/2).
  """
  if weight.ndim != 2 or weight.shape[0] % n_heads or (weight.shape[0] // n_heads) % 2:
    raise ValueError(f"cannot split rows of a {tuple(weight.shape)} weight into {n_heads} heads")
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
