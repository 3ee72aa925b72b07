"""Test set-up: 8 fake CPU devices, so every sharded code path runs in every test.

The flag must be set before JAX is imported anywhere, which is why it lives here.
"""

import atexit
import os
import shutil
import tempfile

# One persistent compilation cache per test worker, inherited by every process it starts: the
# kill-and-resume tests, the pipeline's stages and the notebooks compile the same programs again
# and again in fresh processes (a sigkill test of four runs: 138 s without, 77 s with). A fresh
# directory each session, so nothing from another checkout is ever reused.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="lm-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices; XLA_FLAGS was set too late"


# The longest files first, so that with `-n 2 --dist loadfile` (pytest.ini) the end-to-end chain
# starts at once on one worker while the other works through the rest.
LONGEST_FIRST = ("test_pipeline.py", "test_aot.py", "test_trainer.py", "test_ppo.py",
                 "test_notebooks.py")  # the notebooks: 2-3 minutes, one kernel each


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

  items.sort(key=rank)  # stable: each file keeps its own order
