"""Facts about accelerators: peak dense bf16 FLOP/s and HBM per chip, and TPU slice names.

Used for the MFU estimate in the progress line and by `lm aot` to say whether a step fits.
"""

from __future__ import annotations

import os

import jax

from lm import allocator

GiB = 1024 ** 3

# Peak dense bf16 FLOP/s per chip, from the vendors' published specifications.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100": 312e12, "NVIDIA H100": 989e12,
}
# XLA:CPU's large-matmul ceiling measured on the 2-core development machine, for the whole host:
# a CPU "MFU" is a rough guide only.
CPU_PEAK_FLOPS = 1.8e11

HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}

# Slice names as Cloud TPU writes them (v5p and v4 count TensorCores, two per chip; v5e and v6e
# count chips) -> (topology string for jax.experimental.topologies, chips).
TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", 4), "v4-32": ("v4:2x2x4", 16), "v4-128": ("v4:4x4x4", 64),
    "v4-256": ("v4:4x4x8", 128), "v4-512": ("v4:4x8x8", 256),
    "v5p-8": ("v5p:2x2x1", 4), "v5p-32": ("v5p:2x2x4", 16), "v5p-128": ("v5p:4x4x4", 64),
    "v5p-256": ("v5p:4x4x8", 128), "v5p-512": ("v5p:8x8x4", 256), "v5p-1024": ("v5p:8x8x8", 512),
    "v5e-8": ("v5e:2x4", 8), "v5e-16": ("v5e:4x4", 16), "v5e-64": ("v5e:8x8", 64),
    "v5e-128": ("v5e:8x16", 128), "v5e-256": ("v5e:16x16", 256),
    "v6e-8": ("v6e:2x4", 8), "v6e-64": ("v6e:8x8", 64), "v6e-256": ("v6e:16x16", 256),
}


def peak_flops_per_device(device=None) -> float:
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return CPU_PEAK_FLOPS / len(jax.devices())  # fake devices share the host's cores
  kind = getattr(device, "device_kind", "")
  for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return flops
  return 0.0


def flops_per_token(n_params: int, n_layers: int, seq_len: int, dim: int) -> float:
  """Training FLOPs per token: 6N for the matmuls plus 12·L·T·D for attention scores."""
  return 6.0 * n_params + 12.0 * n_layers * seq_len * dim


def allocator_advice(maps_path: str = "/proc/self/maps") -> str | None:
  """A one-line suggestion when this process computes on CPU under the C library's malloc with
  its default settings, else None. XLA:CPU allocates and frees large buffers at every step;
  glibc returns them to the kernel and faults them back in (a quarter of the tiny chat run's CPU
  time went to page faults), which tcmalloc and jemalloc avoid, and the glibc settings `lm` runs
  with (lm/allocator.py). MaxText preloads tcmalloc on TPU hosts for the same reason."""
  try:
    with open(maps_path) as f:
      maps = f.read()
  except OSError:  # not Linux: nothing to say
    return None
  if (any(name in maps for name in allocator.FAST_ALLOCATORS)
      or allocator.is_tuned(os.environ) or jax.default_backend() != "cpu"):
    return None
  return ("lm: computing on CPU with the system allocator's defaults; preload tcmalloc or "
          "jemalloc, e.g. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4, or set "
          f"GLIBC_TUNABLES={allocator.GLIBC_TUNABLES} (the `lm` command does so itself unless "
          "LM_GLIBC_TUNING=0; README: 'The allocator')")
