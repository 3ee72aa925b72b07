"""Fact completion: does the model finish "Mira lives in" with Mira's town? (greedy, batched)"""

from __future__ import annotations

import json

import jax

from lm import rollout, sampling
from lm.roles import Role


def load_probes(path: str) -> list[dict]:
  return [json.loads(line) for line in open(path) if line.strip()]


def fact_accuracy(role: Role, tokenizer, probes: list[dict], max_new_tokens: int = 6,
                  batch_size: int = 64) -> float:
  """Fraction of probes whose greedy continuation starts with the answer (ignoring spaces)."""
  prompts = [tokenizer.encode(p["prompt"], bos=True) for p in probes]
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_id)
  samples = rollout.generate(role, prompts, cfg, jax.random.key(0), batch_size=batch_size)
  texts = rollout.decode(samples, tokenizer)
  correct = sum(text.startswith(p["answer"]) for p, text in zip(probes, texts))
  return correct / max(len(probes), 1)
