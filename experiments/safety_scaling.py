"""The safety-data scaling ablation (LLAMA2.md §8.3, Figures 15 and 33), in miniature.

  lm run experiments/safety_scaling.py:tiny --workdir=/tmp/safety_scaling

The pretrained model is fine-tuned six times on the same helpful dialogues with 0 %, 1 %, 10 %,
25 %, 50 % and 100 % of the safety demonstrations (`sft.safety_fraction`); each variant answers
the held-out adversarial, helpful and look-alike prompts, judged by the world's gold scorers and
by one pair of reward models (trained from the 100 % model, as `llama2_chat` trains them).
`chat_eval/tradeoff.png` plots the mean safety RM score, the mean helpfulness RM score and the
false refusals against the share, Figure 15's three panels. The world, tokenizer, pretraining,
100 % SFT and the RMs are `llama2_chat`'s own stages: a chat workdir's can be linked in.
"""

from __future__ import annotations

import ml_collections

from experiments import common, llama2_chat

PRESETS = ("tiny",) + common.PAPER_SIZES
SHARES = (0.0, 0.01, 0.1, 0.25, 0.5, 1.0)


def variant(share: float) -> str:
  """The stage fine-tuned with `share` of the safety data; 100 % is llama2_chat's own SFT."""
  return "sft" if share == 1.0 else f"sft_safety_{round(share * 100)}"


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  c = llama2_chat.get_config(preset)
  shared = ("world", "tokenizer", "pretrain", "sft", "rm_helpful", "rm_safety")
  c.pipeline = tuple(s for s in c.pipeline if s in shared)
  for stage in [s for s in c.stages if s not in shared]:
    del c.stages[stage]
  for share in SHARES[:-1]:
    c.stages[variant(share)] = llama2_chat.sft_stage(preset)
    c.stages[variant(share)].safety_fraction = share
  c.stages.chat_eval = llama2_chat.chat_eval_stage(
      preset, tuple(variant(s) for s in SHARES), x=SHARES, x_label="share of the safety data")
  c.pipeline = c.pipeline + tuple(variant(s) for s in SHARES[:-1]) + ("chat_eval",)
  return c
