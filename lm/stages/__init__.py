"""The stage registry: one module per stage kind, each with a typed config.

A stage module exposes:
  Config              a frozen dataclass of every field of the stage's config section, defaults
                      written once (experiments build their sections from it; `lm run` builds it
                      back from the section, naming any unknown or missing field)
  run(cfg, ctx)       -> metrics
  evaluate(cfg, ctx, model_dir) -> metrics, for `lm eval` (stages with evaluations)
  PROGRAMS            {name: builder(cfg, model_cfg, mesh) -> (jitted fn, abstract args, FLOPs)}
                      the programs `lm aot` compiles (trained and sampling stages)

Stages are the one place where model, data, sampling and trainer meet.
"""

from __future__ import annotations

import importlib

from lm import config_utils

KINDS = ("world", "tokenizer", "pretrain", "sft", "gatt", "reward", "rejection_sampling", "ppo",
         "context_distillation", "chat_eval", "collect_preferences")


def stage_module(kind: str):
  if kind not in KINDS:
    raise ValueError(f"unknown stage kind {kind!r}; known kinds: {KINDS}")
  return importlib.import_module(f"lm.stages.{kind}")


def typed_config(section, where: str):
  """A stage's config section (ConfigDict) -> its kind's Config, every field checked."""
  kind = section.get("kind") if hasattr(section, "get") else None
  if kind is None:
    raise ValueError(f"{where}: the section has no `kind` (one of {KINDS})")
  return config_utils.from_config(stage_module(kind).Config, section, where)
