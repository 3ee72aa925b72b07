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
# temporaries; the reward step), the chat presets' tensor-4 mesh, the scalar head, and PPO's
# programs, which include the sampling program of GAtt and rejection sampling and the latter's
# scoring (their train steps are SFT's). The other figures in the README come from the same
# code (`lm aot experiments/pretrain.py:7b --topology=v5p-128`, `--stage=gatt`, ...).
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


def test_a_reward_model_fits_its_slice():
  """A reward model compiles its train step (scalar head, 512 pairs in 8 micro-batches)."""
  reports = aot.fit_reports(llama2_chat.get_config("13b"), "v5e-256", "rm_helpful")
  assert list(reports) == ["train step"]
  print(f"\n13b rm_helpful on v5e-256\n{reports['train step'].table()}")
  assert reports["train step"].fits
  assert_holds(reports["train step"], "13b", 12, "scalar")


def test_ppo_fits_with_all_five_roles_resident():
  """70B PPO on v5p-512: the rollout (GAtt's and rejection sampling's sampling program), the
  update step of policy and value under one AdamW, the frozen reference's log-probs (bf16) and a
  reward model's scoring (rejection sampling's, bf16). The five roles stay resident together:
  the update's state, the reference and both RMs, plus the largest program's temporaries."""
  reports = aot.fit_reports(llama2_chat.get_config("70b"), "v5p-512", "ppo")
  assert list(reports) == ["rollout", "update step", "reference log-probs", "scoring"]
  for report in reports.values():
    print(f"\n70b ppo on v5p-512\n{report.table()}")
    assert report.fits
  update = reports["update step"]
  # fp32 policy and value with AdamW's two moments: 12 bytes a parameter of each.
  n_params = 2 * N_PARAMS["70b"] - 32_000 * 8192 + 8192
  held = 12 * n_params / update.chips
  assert held <= update.argument_bytes < 1.2 * held + 2**30
  assert_holds(reports["rollout"], "70b", 4)
  assert_holds(reports["reference log-probs"], "70b", 2)
  assert_holds(reports["scoring"], "70b", 2, "scalar")
  resident = (update.argument_bytes + reports["reference log-probs"].argument_bytes
              + 2 * reports["scoring"].argument_bytes)
  assert resident + max(r.temp_bytes for r in reports.values()) < update.hbm_bytes


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
