"""The glibc malloc settings `lm` re-executes itself with on CPU (lm/allocator.py)."""

import os
import subprocess
import sys

import pytest

from lm import allocator

GLIBC = (2, 36)
PLAIN = {"PATH": "/usr/bin", "HOME": "/root"}


def test_the_settings_apply_to_cpu_compute_under_glibc_defaults_only():
  tuned = allocator.tuned_environment(PLAIN, libc=GLIBC, has_accelerator=False)
  assert tuned == {**PLAIN, "GLIBC_TUNABLES": allocator.GLIBC_TUNABLES}
  assert allocator.is_tuned(tuned) and not allocator.is_tuned(PLAIN)
  # An accelerator host computes off the host heap, unless JAX is told to use the CPU.
  assert allocator.tuned_environment(PLAIN, libc=GLIBC, has_accelerator=True) is None
  assert allocator.tuned_environment({**PLAIN, "JAX_PLATFORMS": "cpu"}, libc=GLIBC,
                                     has_accelerator=True) is not None
  assert allocator.tuned_environment({**PLAIN, "JAX_PLATFORMS": "tpu"}, libc=GLIBC,
                                     has_accelerator=False) is None
  left_alone = [
      {**PLAIN, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},  # the user's own settings
      {**PLAIN, "MALLOC_ARENA_MAX": "4"},  # the same, by glibc's older name
      {**PLAIN, "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
      {**PLAIN, "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
      {**PLAIN, "LM_GLIBC_TUNING": "0"},
  ]
  for environ in left_alone:
    assert allocator.tuned_environment(environ, libc=GLIBC, has_accelerator=False) is None
  assert allocator.tuned_environment(PLAIN, libc=(2, 25), has_accelerator=False) is None
  assert allocator.tuned_environment(PLAIN, libc=None, has_accelerator=False) is None  # musl


# A program whose temporary buffer holds 256 MB (65,536 pages of 4 KB), which XLA:CPU allocates at
# every call and frees after. It prints the page faults of each of CALLS calls.
CALLS = 40
PROGRAM = f"""
import resource, jax, jax.numpy as jnp
f = jax.jit(jax.grad(lambda w, x: jnp.tanh(x @ w).sum()))
x, w = jnp.ones((8192, 64)) * 1e-3, jnp.ones((64, 8192)) * 1e-3
for _ in range({CALLS}):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(w, x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
BUFFER_PAGES = 65_536


@pytest.mark.skipif(allocator.glibc_version() is None or allocator.glibc_version() < (2, 26),
                    reason="glibc tunables only")
def test_under_the_settings_repeated_calls_do_not_fault_their_buffers_in_again():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  faults = {}
  for name, extra in (("default", {}), ("tuned", {"GLIBC_TUNABLES": allocator.GLIBC_TUNABLES})):
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                            env={**env, **extra})
    assert result.returncode == 0, result.stderr[-2000:]
    faults[name] = [int(line) for line in result.stdout.split()]
  refaulted = {name: sum(calls) / BUFFER_PAGES for name, calls in faults.items()}
  # Under glibc's defaults every call faults the whole buffer in again (unless the kernel backs
  # the mapping with huge pages): 40-41 buffers' worth in 40 calls on a 2-core AMD EPYC. Under
  # the settings the heap grows by a buffer whenever a freed buffer's hole was partly taken by
  # smaller blocks; it settles at a few buffers: 3-5 buffers' worth in 40 calls there, the
  # later calls faulting none. A quarter of the calls refaulting would be the defaults' doing.
  assert refaulted["tuned"] < CALLS / 4, (refaulted, faults)


def test_lm_restarts_itself_with_the_settings_and_stops_advising_them():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  command = [sys.executable, "-m", "lm.cli", "sample", "--preset=tiny", "--prompt_ids=1,5",
             "--max_new_tokens=2"]
  advice = "computing on CPU with the system allocator"
  if allocator.tuned_environment(env) is None:
    pytest.skip("this host keeps glibc's defaults (not glibc, or an allocator is preloaded)")
  tuned = subprocess.run(command, capture_output=True, text=True, env=env)
  assert tuned.returncode == 0, tuned.stderr[-2000:]
  assert advice not in tuned.stderr
  untuned = subprocess.run(command, capture_output=True, text=True,
                           env={**env, "LM_GLIBC_TUNING": "0"})
  assert untuned.returncode == 0, untuned.stderr[-2000:]
  assert advice in untuned.stderr and allocator.GLIBC_TUNABLES in untuned.stderr
  assert tuned.stdout == untuned.stdout  # the same tokens
