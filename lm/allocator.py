"""glibc malloc settings for computing on CPU, applied by re-executing `lm` (no jax import here).

XLA:CPU allocates each program's temporary buffer afresh at every call (3.7 GB for bench-50M's
gradient) and frees it after. Under glibc's defaults an allocation that large is a new mmap
from a thread's arena every time, so every page of it faults in again at every step: ~970k
page faults a step. tcmalloc or jemalloc keep the memory (the README's "The allocator"); where
neither is installed, three glibc tunables do the same:

  arena_max=1       every thread allocates from the main heap, which can grow past the 64 MB a
                    thread arena may hold (a thread arena mmaps anything larger, whatever else
                    is set)
  mmap_max=0        large blocks come from that heap, not from mmap
  trim_threshold    (1 TiB) freed memory stays mapped for the next step

The process keeps its peak heap until it exits: a few copies of the largest temporary, since
a freed buffer's place partly taken by smaller blocks sends the next one to the top of the heap.
glibc reads tunables only when a process starts, so `lm` sets GLIBC_TUNABLES and re-executes
itself once (the pid stays the same). It does not when the variable is already set (the user's
choice, or after the re-exec), when malloc's older variables (MALLOC_ARENA_MAX, ...) are set,
when tcmalloc or jemalloc is preloaded, when the C library is not glibc, on a host with an
accelerator (unless JAX_PLATFORMS asks for cpu), or when LM_GLIBC_TUNING=0.
"""

from __future__ import annotations

import glob
import os
from typing import Mapping

GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  f"glibc.malloc.trim_threshold={1 << 40}")
# glibc's older names for its malloc tunables: set, they are the user's settings.
MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_",
                    "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
FAST_ALLOCATORS = ("libtcmalloc", "libjemalloc")
# Device nodes of TPUs (accel, vfio) and NVIDIA GPUs: there the steps run off the host's heap.
ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running C library if it is glibc, else None."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


HOST = "host"  # tuned_environment's default: look at this host


def tuned_environment(environ: Mapping[str, str], libc: tuple[int, int] | None | str = HOST,
                      has_accelerator: bool | str = HOST) -> dict[str, str] | None:
  """`environ` with GLIBC_TUNABLES set for CPU compute, or None when it should stay as it is
  (see the module docstring). `libc`: glibc's (major, minor), None for another C library;
  `libc` and `has_accelerator` default to this host's."""
  libc = glibc_version() if libc == HOST else libc
  if has_accelerator == HOST:
    has_accelerator = any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)
  platforms = environ.get("JAX_PLATFORMS", "")
  cpu_only = platforms == "cpu" or (not platforms and not has_accelerator)
  if (environ.get("LM_GLIBC_TUNING", "1") == "0" or "GLIBC_TUNABLES" in environ
      or any(name in environ for name in MALLOC_VARIABLES)
      or any(name in environ.get("LD_PRELOAD", "") for name in FAST_ALLOCATORS)
      or libc is None or libc < (2, 26) or not cpu_only):  # tunables came in glibc 2.26
    return None
  return {**environ, "GLIBC_TUNABLES": GLIBC_TUNABLES}


def is_tuned(environ: Mapping[str, str]) -> bool:
  """Whether this process started with the settings above."""
  return environ.get("GLIBC_TUNABLES") == GLIBC_TUNABLES
