"""Fact completion: does the model finish "Mira lives in" with Mira's town? (greedy, batched)"""

from __future__ import annotations

import json

import jax
import numpy as np

from lm import sampling


def load_probes(path: str) -> list[dict]:
  return [json.loads(line) for line in open(path) if line.strip()]


def fact_accuracy(graphdef, model_cfg, params, tokenizer, probes: list[dict], mesh=None,
                  max_new_tokens: int = 6) -> float:
  """Fraction of probes whose greedy continuation starts with the answer (ignoring spaces)."""
  prompts = [tokenizer.encode(p["prompt"], bos=True) for p in probes]
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_id)
  tokens, segment_ids = sampling.left_pad(prompts)
  context = jax.set_mesh(mesh) if mesh is not None else _nullcontext()
  with context:
    out = sampling.generate(graphdef, model_cfg, params, tokens, segment_ids,
                            jax.random.key(0), cfg)
  out_tokens = np.asarray(out.tokens)
  correct = 0
  for probe, row in zip(probes, out_tokens):
    text = tokenizer.decode([t for t in row.tolist() if t != tokenizer.eos_id]).strip()
    correct += text.startswith(probe["answer"])
  return correct / max(len(probes), 1)


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False
