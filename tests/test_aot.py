"""`lm aot`: the paper's sizes compile for TPU slices on this CPU host and fit in HBM.

Each compile takes one to four minutes on 2 cores; the figures are printed for the record.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[tpu]'")

from experiments import llama2_chat, pretrain  # noqa: E402
from lm import aot  # noqa: E402

# Each compile takes one to four minutes here, so the cases are chosen to cover the most between
# them: MHA (13b) and GQA (70b), gradient accumulation (70b pretraining, the largest
# temporaries; the reward step), the chat presets' tensor-4 mesh, the scalar head, and GAtt's
# sampling program (GAtt's train step is SFT's). The 7b figures in
# the README come from the same code (`lm aot experiments/pretrain.py:7b --topology=v5p-128`).
CASES = [("70b", "v5p-512")]
CHIPS = {"v5p-128": 64, "v5e-256": 256, "v5p-512": 256}
N_PARAMS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}


def assert_holds(report, preset, bytes_per_param, head="lm"):
  """The program's arguments are the model's (fp32) parameters, plus AdamW's two moments for a
  train step, spread over the chips. A scalar head is one vector where the LM head is [D, V]."""
  assert report.chips == CHIPS[report.topology]
  n_params = N_PARAMS[preset]
  if head == "scalar":
    dim = {"13b": 5120, "70b": 8192}[preset]
    n_params -= 32_000 * dim - dim
  held = bytes_per_param * n_params / report.chips
  assert held <= report.argument_bytes < 1.2 * held + 2**30


@pytest.mark.parametrize("preset, topology", CASES)
def test_paper_sizes_fit_their_slices(preset, topology):
  report = aot.fit_reports(pretrain.get_config(preset), topology)["train step"]
  print(f"\n{preset} on {topology}\n{report.table()}")
  assert report.fits
  assert_holds(report, preset, 12)


@pytest.mark.parametrize("preset, topology, stage", [("13b", "v5e-256", "rm_helpful"),
                                                     ("70b", "v5p-512", "gatt"),
                                                     ("70b", "v5p-512", "rs_v1")])
def test_chat_stages_fit_their_slices(preset, topology, stage):
  """A reward model compiles its train step (scalar head, 512 pairs in 8 micro-batches); GAtt its
  train step (SFT's, on other data) and its sampling program (a batch of prompts at the longest
  the budget allows, then the decode loop over the KV cache)."""
  reports = aot.fit_reports(llama2_chat.get_config(preset), topology, stage)
  programs = {"gatt": ["sampling"], "rs_v1": ["sampling", "scoring"]}.get(stage, [])
  assert list(reports) == ["train step"] + programs
  for report in reports.values():
    print(f"\n{preset} {stage} on {topology}\n{report.table()}")
    assert report.fits
  assert_holds(reports["train step"], preset, 12, "scalar" if stage.startswith("rm") else "lm")
  if "sampling" in reports:
    assert_holds(reports["sampling"], preset, 4)
  if "scoring" in reports:  # a bf16 RM of the policy's size: 2 bytes a parameter
    assert_holds(reports["scoring"], preset, 2, "scalar")


def test_cli_prints_the_fit_table_and_errors_are_clear():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "lm.cli", "aot", "experiments/pretrain.py:smoke", "--topology=v5e-8"],
      capture_output=True, text=True, env=env, timeout=600,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "train step on topology v5e-8: 8 chips" in result.stdout
  assert "fits: yes" in result.stdout and "temporaries" in result.stdout
  result = subprocess.run(
      [sys.executable, "-m", "lm.cli", "aot", "experiments/pretrain.py:smoke", "--topology=v9-8"],
      capture_output=True, text=True, env=env, timeout=600,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode != 0 and "unknown TPU slice 'v9-8'" in result.stderr
