"""Chat evals: answer accuracy on held-out questions and the stop-at-EOS rate (greedy, batched)."""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np

from lm import sampling


def load_questions(path: str) -> list[dict]:
  return [json.loads(line) for line in open(path) if line.strip()]


def answer_metrics(graphdef, model_cfg, params, tokenizer, questions: list[dict], mesh=None,
                   max_new_tokens: int = 24, batch_size: int = 64) -> dict:
  """{"answer_accuracy": share of answers containing the right value (case-insensitive),
  "stop_at_eos": share of answers that end with EOS within max_new_tokens}."""
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_id)
  correct = stopped = 0
  context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  for start in range(0, len(questions), batch_size):
    chunk = questions[start:start + batch_size]
    prompts = [tokenizer.encode_dialog([{"role": "user", "content": q["question"]}]).tokens.tolist()
               for q in chunk]
    with context:
      out = sampling.generate(graphdef, model_cfg, params, *sampling.left_pad(prompts),
                              jax.random.key(0), cfg)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for question, row, length in zip(chunk, tokens, lengths):
      produced = row[:length].tolist()
      stopped += bool(produced) and produced[-1] == tokenizer.eos_id
      text = tokenizer.decode([t for t in produced if t != tokenizer.eos_id])
      correct += str(question["answer"]).lower() in text.lower()
  n = max(len(questions), 1)
  return {"answer_accuracy": correct / n, "stop_at_eos": stopped / n}
