"""Model shapes: `ModelConfig`, the paper's presets, and parameter counting.

Dimension letters used across the code base (einsum strings, shape comments, docstrings):

  B batch          T query positions     S key positions     D model width (`dim`)
  N query heads    K key/value heads     G queries per KV head (N // K)
  H head dim       F feed-forward width  V vocab             L layers
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
ATTENTION_IMPLS = ("xla", "blocked", "cudnn", "splash")  # lm/attention.py
WEIGHT_LAYOUTS = ("in_out", "out_in")  # lm/projection.py


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """The SwiGLU width rule of Meta's `FeedForward.__init__` (LLAMA2.md §1.3)."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * math.ceil(hidden / multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The shape and numerics of a Llama 2 model.

  `n_kv_heads=None` means multi-head attention (n_kv_heads == n_heads), as in Meta's params.json.
  `ffn_dim` overrides the width rule when set (used by small presets whose width is chosen by hand).
  """

  vocab_size: int = 32000
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int | None = None
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  ffn_dim: int | None = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_seq_len: int = 4096
  # Numerics: parameters are stored in `param_dtype` and cast to `compute_dtype` where used.
  # RMSNorm, softmax and the logits are always computed in float32 (LLAMA2.md §1.4).
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  init_std: float = 0.02
  # Memory: what each scanned layer keeps for the backward pass (see lm/model.py:REMAT).
  remat: str = "full"
  # True: one compiled layer, scanned over the stack (compile time flat in depth, what TPU pods
  # want). False: the scan fully unrolled, the same numbers up to float rounding without its
  # per-layer slicing of weights and stacking of saved activations, which on XLA:CPU costs a
  # shallow model ~1.25x in training step time.
  scan_layers: bool = True
  attention: str = "xla"
  attention_block: int = 64  # queries per block of attention="blocked"
  # Projection weights stored [*in, *out] (Meta's layout; checkpoints, training) or [*out, *in]
  # (a generation copy on CPU, `roles.in_dtype`: XLA:CPU's bf16 products read it faster).
  weight_layout: str = "in_out"

  def __post_init__(self):
    problems = []
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "attention_block"):
      if getattr(self, name) <= 0:
        problems.append(f"{name}={getattr(self, name)} must be positive")
    if self.n_heads > 0 and self.dim % self.n_heads:
      problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
    elif self.n_heads > 0 and (self.dim // self.n_heads) % 2:
      problems.append(f"head_dim={self.dim // self.n_heads} must be even for rotary embeddings")
    if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
      problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      problems.append(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
    if self.weight_layout not in WEIGHT_LAYOUTS:
      problems.append(f"weight_layout={self.weight_layout!r} is not one of {WEIGHT_LAYOUTS}")
    for name in ("param_dtype", "compute_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        problems.append(f"{name}={getattr(self, name)!r} is not a dtype")
    if problems:
      raise ValueError("invalid ModelConfig: " + "; ".join(problems))

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def hidden_dim(self) -> int:
    if self.ffn_dim is not None:
      return self.ffn_dim
    return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(known)}")
    return cls(**values)


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters of the language model (LLAMA2.md §1.4)."""
  d, kv_dim = cfg.dim, cfg.kv_heads * cfg.head_dim
  per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * cfg.hidden_dim + 2 * d
  return cfg.n_layers * per_layer + 2 * cfg.vocab_size * d + d


# The paper's sizes (LLAMA2.md §1.2). 34B is inferred from Code Llama 34B and is marked [U] there.
PRESETS: dict[str, ModelConfig] = {
    "7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
    "13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, multiple_of=256),
    "34b": ModelConfig(
        dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0
    ),
    "70b": ModelConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
    # A benchmark size that exercises the real vocabulary and GQA at laptop scale.
    "bench-50M": ModelConfig(
        vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1536,
        max_seq_len=1024, remat="none",
    ),
    # For tests: every code path (GQA, scan, sharding over 8 devices) at a size that runs in
    # milliseconds. Widths are multiples of 8 so every mesh axis divides them.
    "tiny": ModelConfig(
        vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=192,
        max_seq_len=128, compute_dtype="float32", remat="none",
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  """A preset by name, with optional field overrides: `get_preset("7b", remat="dots")`."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
