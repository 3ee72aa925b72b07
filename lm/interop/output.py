"""Output directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
  """Yields a scratch directory `DST.tmp-<pid>` that becomes DST when the block succeeds.

  An exception removes the scratch directory; a killed process leaves it under its scratch name,
  so DST never looks complete unless it is. An existing DST is an error unless `overwrite`; then
  it is replaced only after the new one is whole.
  """
  dst = os.path.abspath(os.fspath(dst))
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
  tmp = f"{dst}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.lexists(dst):
    old = f"{dst}.old-{os.getpid()}"
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, dst)
