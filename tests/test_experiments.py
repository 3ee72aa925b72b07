"""Experiment files: every preset builds typed stage configs; the paper's hyperparameters are pinned."""

import math

import pytest

from experiments import llama2_chat, pretrain, safety_scaling
from lm import config_utils, optim
from lm.stages import sft, typed_config

ALL = [(m, p) for m in (pretrain, llama2_chat, safety_scaling) for p in m.PRESETS]


@pytest.mark.parametrize("module, preset", ALL, ids=[f"{m.__name__}:{p}" for m, p in ALL])
def test_every_stage_section_builds_its_typed_config(module, preset):
  config = module.get_config(preset)
  for name in config.pipeline:
    assert typed_config(config.stages[name], f"stages.{name}").kind == config.stages[name].kind


def test_a_misspelled_field_names_the_stage_and_the_field():
  config = llama2_chat.get_config("tiny")
  config.stages.gatt.sampling.temprature = 0.7
  with pytest.raises(ValueError, match=r"stages.gatt.sampling: unknown field\(s\) \['temprature'\]"):
    typed_config(config.stages.gatt, "stages.gatt")


@pytest.mark.parametrize("preset", ["7b", "70b"])
def test_the_paper_hyperparameters(preset):
  """LLAMA2.md §3.2 (pretraining) and §4 (SFT)."""
  c = llama2_chat.get_config(preset)
  pre = typed_config(c.stages.pretrain, "pretrain")
  assert pre.optimizer.lr == {"7b": 3e-4, "70b": 1.5e-4}[preset]
  assert (pre.optimizer.warmup_steps, pre.optimizer.final_lr_fraction) == (2000, 0.1)
  assert (pre.optimizer.b1, pre.optimizer.b2, pre.optimizer.eps) == (0.9, 0.95, 1e-5)
  assert (pre.optimizer.weight_decay, pre.optimizer.grad_clip) == (0.1, 1.0)
  assert pre.train.batch_size * pre.data.seq_len == 1024 * 4096  # 4M tokens per step
  tuned = typed_config(c.stages.sft, "sft")
  assert (tuned.optimizer.lr, tuned.optimizer.schedule, tuned.optimizer.weight_decay) == (
      2e-5, "cosine", 0.1)
  assert (tuned.train.batch_size, tuned.data.seq_len, tuned.epochs) == (64, 4096, 2.0)
  # LLAMA2.md §6.4-6.5: the reward models.
  helpful, safety = (typed_config(c.stages[s], s) for s in ("rm_helpful", "rm_safety"))
  for rm in (helpful, safety):
    assert rm.kind == "reward" and rm.init_from == "sft" and rm.epochs == 1.0
    assert rm.optimizer.lr == {"7b": 1e-5, "70b": 5e-6}[preset]
    assert (rm.optimizer.schedule, rm.optimizer.final_lr_fraction) == ("cosine", 0.1)
    assert (rm.optimizer.b1, rm.optimizer.b2, rm.optimizer.eps) == (0.9, 0.95, 1e-5)
    assert (rm.optimizer.weight_decay, rm.optimizer.grad_clip) == (0.1, 1.0)
    assert (rm.train.batch_size, rm.data.pairs_per_row) == (512, 1)  # 512 pairs, 1024 answers
    assert optim.warmup_steps(rm.optimizer, 1000) == 30  # 3 %, at least 5
    assert optim.warmup_steps(rm.optimizer, 100) == 5
  assert (helpful.data.track, helpful.data.other_share, helpful.margins) == ("helpful", 0.5, "small")
  assert (safety.data.track, safety.data.other_share) == ("safety", 0.1)
  assert helpful.safety_loss_weight == 0 < safety.safety_loss_weight


def test_sft_epochs_count_packed_rows_not_examples():
  """Several examples share a 4096-token row: 2 epochs of 27,540 examples packed into, say,
  6,000 rows is 188 steps of 64 rows, not 2 * 27540 // 64 = 860 (5 epochs)."""
  cfg = typed_config(llama2_chat.get_config("7b").stages.sft, "sft")
  assert sft.train_steps(cfg, packed_rows=6000) == math.ceil(2 * 6000 / 64) == 188
  tiny = typed_config(llama2_chat.get_config("tiny").stages.sft, "sft")
  assert tiny.epochs == 0 and sft.train_steps(tiny, packed_rows=6000) == tiny.train.steps


def test_every_data_section_takes_an_eval_source():
  config = llama2_chat.get_config("7b")
  config_utils.check_overrides(config, [f"--config.stages.{s}.data.eval_source=/data/{s}.jsonl"
                                        for s in ("pretrain", "sft", "gatt", "rm_helpful")])
