"""Where the RLHF stages (rejection sampling, PPO, context distillation, chat_eval) read their
prompts: a stage that wrote prompts/ (the world) or JSONL paths, named by a stage's `data` and
`eval` sections.
"""

from __future__ import annotations

import os

from data_pipelines import preferences


def prompt_file(cfg, ctx, split: str) -> str:
  """The prompts JSONL of `split` ("train" or "eval"): the source stage's prompts/<split>.jsonl,
  or the path `data.source` / `data.eval_source` gives."""
  explicit = cfg.data.source if split == "train" else cfg.data.eval_source
  if cfg.data.source in ctx.outputs and not (split == "eval" and explicit):
    return os.path.join(ctx.outputs[cfg.data.source], "prompts", f"{split}.jsonl")
  if not explicit:
    raise ValueError(f"stages.{ctx.name}.data.{'source' if split == 'train' else 'eval_source'} "
                     f"is empty: give prompt JSONL or a stage that wrote prompts/")
  return explicit


def lookalike_prompts(cfg, ctx, bad) -> list:
  """The look-alike prompts of `cfg.eval.lookalikes` (rejection_sampling.Eval): a path, "" for
  the source stage's prompts/lookalikes.jsonl when it wrote one, "none"; [] for none."""
  given = cfg.eval.lookalikes
  if given == "none":
    return []
  if not given:
    if cfg.data.source not in ctx.outputs:
      return []
    given = os.path.join(ctx.outputs[cfg.data.source], "prompts", "lookalikes.jsonl")
    if not os.path.exists(given):
      return []
  elif not os.path.exists(given):
    raise ValueError(f"stages.{ctx.name}.eval.lookalikes: {given} does not exist")
  return preferences.read_prompts(given, bad)
