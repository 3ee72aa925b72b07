"""`lm aot`: the paper's sizes compile for TPU slices on this CPU host and fit in HBM.

Each compile takes about a minute on 2 cores; the figures are printed for the record.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")

from experiments import pretrain  # noqa: E402
from lm import aot  # noqa: E402

CASES = [("7b", "v5p-128"), ("13b", "v5e-256"), ("70b", "v5p-512")]


@pytest.mark.parametrize("preset, topology", CASES)
def test_paper_sizes_fit_their_slices(preset, topology):
  report = aot.fit_report(pretrain.get_config(preset), topology)
  print(f"\n{preset} on {topology}\n{report.table()}")
  assert report.chips == {"v5p-128": 64, "v5e-256": 256, "v5p-512": 256}[topology]
  assert report.fits
  # Parameters (fp32) plus AdamW moments are 12 bytes per parameter, spread over the chips.
  n_params = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}[preset]
  assert report.argument_bytes >= 12 * n_params / report.chips
  assert report.argument_bytes < 1.2 * 12 * n_params / report.chips + 2**30


def test_cli_prints_the_fit_table_and_errors_are_clear():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "lm.cli", "aot", "experiments/pretrain.py:smoke", "--topology=v5e-8"],
      capture_output=True, text=True, env=env, timeout=600,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "fits: yes" in result.stdout and "temporaries" in result.stdout
  result = subprocess.run(
      [sys.executable, "-m", "lm.cli", "aot", "experiments/pretrain.py:smoke", "--topology=v9-8"],
      capture_output=True, text=True, env=env, timeout=600,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode != 0 and "unknown TPU slice 'v9-8'" in result.stderr
