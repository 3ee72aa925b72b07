"""One module per stage. Each exposes `run(cfg, ctx) -> metrics` and, for trained stages,
`train_step_for_aot(cfg, mesh) -> (jitted step, abstract args, rules, model FLOPs per step)`;
stages that also sample expose `sampling_for_aot(cfg, mesh)`, of the same form, for `lm aot`;
stages with evaluations expose `evaluate(cfg, ctx, model_dir) -> metrics` for `lm eval`.

Stages are the one place where model, data, sampling and trainer meet.
"""

from __future__ import annotations

import importlib

KINDS = ("world", "tokenizer", "pretrain", "sft", "gatt")


def stage_module(kind: str):
  if kind not in KINDS:
    raise ValueError(f"unknown stage kind {kind!r}; known kinds: {KINDS}")
  return importlib.import_module(f"lm.stages.{kind}")
