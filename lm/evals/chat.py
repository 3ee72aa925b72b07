"""Chat evals: answer accuracy on held-out questions and the stop-at-EOS rate (greedy, batched)."""

from __future__ import annotations

import json
import re

import jax

from lm import rollout, sampling
from lm.roles import Role


def load_questions(path: str) -> list[dict]:
  return [json.loads(line) for line in open(path) if line.strip()]


def contains_answer(text: str, answer) -> bool:
  """The answer as a whole word or number of `text`, case-insensitive ("4" is not in "41")."""
  return re.search(rf"(?<!\w){re.escape(str(answer).lower())}(?!\w)", text.lower()) is not None


def answer_metrics(role: Role, tokenizer, questions: list[dict], max_new_tokens: int = 24,
                   batch_size: int = 64) -> dict:
  """{"answer_accuracy": share of answers containing the right value as a whole word,
  "stop_at_eos": share of answers that end with EOS within max_new_tokens}."""
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_id)
  prompts = [tokenizer.encode_dialog([{"role": "user", "content": q["question"]}]).tokens.tolist()
             for q in questions]
  samples = rollout.generate(role, prompts, cfg, jax.random.key(0), batch_size=batch_size)
  texts = rollout.decode(samples, tokenizer)
  n = max(len(questions), 1)
  correct = sum(contains_answer(text, q["answer"]) for q, text in zip(questions, texts))
  return {"answer_accuracy": correct / n, "stop_at_eos": float(samples.finished.sum()) / n}
