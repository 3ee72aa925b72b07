"""User tasks from local JSONL: few-shot multiple choice and generation, scored by accuracy.

  multiple_choice rows: {"question": "Mira lives in", "choices": ["Tarn", "Velloran"], "answer": 1}
  generation rows:      {"prompt": "Mira lives in", "answer": "Velloran"}

The first `shots` rows of the demonstration file (the task file itself unless another is given)
are the few-shot examples, written before every question as "QUESTION ANSWER" lines; when they
come from the task file they are not scored. Put a template in the text itself if the model
wants one ("Question: ...\nAnswer:").

Multiple choice scores each choice by its summed log-likelihood given the prompt (a leading space
is implied, as SentencePiece's dummy prefix gives one) and by that sum over the choice's token
count; `accuracy` and `accuracy_norm` are the shares of rows whose argmax is the answer.
Generation decodes greedily up to `max_new_tokens` or EOS, cuts at the stop string, and counts
an exact match after normalising case, punctuation and whitespace.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from typing import Sequence

import jax
import numpy as np

from lm import checkpoints, rollout, sampling
from lm.evals import likelihood
from lm.roles import Role

KINDS = ("multiple_choice", "generation")
# Example tasks built from the synthetic world's fact probes (DIR/probes.jsonl).
WORLD_TASKS = {"facts_mc": "multiple_choice", "facts_gen": "generation"}
DEMO_SEPARATOR = "\n"


def _row_error(path: str, line: int, reason: str) -> ValueError:
  return ValueError(f"{path}:{line}: {reason}")


def _check_row(row, kind: str, path: str, line: int) -> None:
  if not isinstance(row, dict):
    raise _row_error(path, line, f"expected a JSON object, got {type(row).__name__}")
  if kind == "multiple_choice":
    if not isinstance(row.get("question"), str):
      raise _row_error(path, line, 'multiple_choice rows need "question": a string')
    choices = row.get("choices")
    if (not isinstance(choices, list) or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)):
      raise _row_error(path, line, '"choices" must be a list of at least 2 non-empty strings')
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
      raise _row_error(path, line, f'"answer" must be an index into the {len(choices)} choices, '
                       f"got {answer!r}")
  else:
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
      raise _row_error(path, line, 'generation rows need "prompt": a non-empty string')
    if not isinstance(row.get("answer"), (str, int, float)) or isinstance(row["answer"], bool):
      raise _row_error(path, line, 'generation rows need "answer": a string or number')


def infer_kind(row: dict) -> str:
  """"multiple_choice" for a row with "choices", else "generation"."""
  return "multiple_choice" if isinstance(row, dict) and "choices" in row else "generation"


def load_task(path: str, kind: str | None = None) -> tuple[str, list[dict]]:
  """(kind, rows) of a task file; each row gains "line" (1-based) for reports.

  Raises:
    ValueError: `path:line: reason` for the first bad row (invalid JSON, a missing or mistyped
      field, an answer index out of range), or an unknown kind / an empty file.
  """
  if kind is not None and kind not in KINDS:
    raise ValueError(f"unknown task kind {kind!r}; choose one of {KINDS}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"task file {path} does not exist")
  rows = []
  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        raise _row_error(path, line, f"not valid JSON ({e.msg} at column {e.colno})") from None
      kind = kind or infer_kind(row)
      _check_row(row, kind, path, line)
      rows.append(dict(row, line=line))
  if not rows:
    raise ValueError(f"{path}: no rows")
  return kind, rows


def world_task(world_dir: str, name: str, seed: int = 0, num_choices: int = 4) -> list[dict]:
  """An example task from the world's fact probes ("Mira lives in" -> "Velloran").

  facts_gen: the probes as they are. facts_mc: each probe with its answer and up to
  num_choices - 1 distractors drawn from the other answers of the same relation ("lives in"
  offers towns, "keeps a" pets), in a seeded order.
  """
  if name not in WORLD_TASKS:
    raise ValueError(f"unknown world task {name!r}; choose one of {sorted(WORLD_TASKS)}")
  path = os.path.join(world_dir, "probes.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; give the world stage's output directory "
                            "(e.g. WORKDIR/world, or `python -m data_pipelines.world --out=DIR`)")
  probes = [json.loads(text) for text in open(path, encoding="utf-8") if text.strip()]
  if name == "facts_gen":
    return [{"prompt": p["prompt"], "answer": p["answer"]} for p in probes]
  relation = lambda p: p["prompt"].split(" ", 1)[-1]  # "Mira lives in" -> "lives in"
  answers: dict[str, list[str]] = {}
  for p in probes:
    answers.setdefault(relation(p), [])
    if p["answer"] not in answers[relation(p)]:
      answers[relation(p)].append(p["answer"])
  rng = random.Random(seed)
  rows = []
  for p in probes:
    others = sorted(a for a in answers[relation(p)] if a != p["answer"])
    choices = [p["answer"]] + rng.sample(others, min(num_choices - 1, len(others)))
    rng.shuffle(choices)
    rows.append({"question": p["prompt"], "choices": choices, "answer": choices.index(p["answer"])})
  return rows


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """Rows one JSON object a line, through a temporary file (readers never see half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
  os.replace(tmp, path)


def demonstrations(rows: Sequence[dict], kind: str) -> str:
  """The few-shot prefix: each row as "QUESTION ANSWER", one a line."""
  if kind == "multiple_choice":
    lines = [f"{r['question']} {r['choices'][r['answer']]}" for r in rows]
  else:
    lines = [f"{r['prompt']} {r['answer']}" for r in rows]
  return "".join(line + DEMO_SEPARATOR for line in lines)


def normalize(text) -> str:
  """Lower case, no punctuation, single spaces: "  The Velloran." -> "the velloran"."""
  text = str(text).lower().translate(str.maketrans("", "", string.punctuation))
  return re.sub(r"\s+", " ", text).strip()


def multiple_choice(role: Role, tokenizer, rows: Sequence[dict], prefix: str = "",
                    batch_size: int = 16) -> tuple[dict, list[dict]]:
  """(metrics, predictions): accuracy by summed and by per-token log-likelihood.

  Each choice is scored as log p(choice tokens | BOS + prefix + question); a row whose prompt and
  choice do not fit the model's context is an error naming its line.
  """
  pairs, starts = [], []
  limit = role.model_cfg.max_seq_len
  for k, row in enumerate(rows):
    context = tokenizer.encode(prefix + row["question"], bos=True)
    starts.append(len(pairs))
    for choice in row["choices"]:
      continuation = tokenizer.encode(choice)
      if len(context) + len(continuation) > limit:
        raise ValueError(f"line {row['line']}: prompt and choice {choice!r} take "
                         f"{len(context) + len(continuation)} tokens, more than the model's "
                         f"max_seq_len {limit} (use fewer shots)")
      pairs.append((context, continuation))
  summed = likelihood.continuation_logprobs(role, pairs, batch_size=batch_size)
  counts = np.array([len(c) for _, c in pairs], np.float32)
  predictions, correct, correct_norm = [], 0, 0
  for k, row in enumerate(rows):
    mine = slice(starts[k], starts[k] + len(row["choices"]))
    scores, scores_norm = summed[mine], summed[mine] / counts[mine]
    choice, choice_norm = int(np.argmax(scores)), int(np.argmax(scores_norm))
    correct += choice == row["answer"]
    correct_norm += choice_norm == row["answer"]
    predictions.append({"line": row["line"], "question": row["question"], "answer": row["answer"],
                        "prediction": choice, "prediction_norm": choice_norm,
                        "correct": choice == row["answer"],
                        "correct_norm": choice_norm == row["answer"],
                        "logprobs": [float(s) for s in scores],
                        "logprobs_per_token": [float(s) for s in scores_norm]})
  n = len(rows)
  return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n}, predictions


def generation(role: Role, tokenizer, rows: Sequence[dict], prefix: str = "",
               max_new_tokens: int = 16, stop: str = DEMO_SEPARATOR,
               batch_size: int = 16) -> tuple[dict, list[dict]]:
  """(metrics, predictions): greedy continuations, cut at `stop`, exact match after normalize."""
  prompts = [tokenizer.encode(prefix + row["prompt"], bos=True) for row in rows]
  limit = role.model_cfg.max_seq_len
  for row, prompt in zip(rows, prompts):
    if len(prompt) + max_new_tokens > limit:
      raise ValueError(f"line {row['line']}: prompt of {len(prompt)} tokens + {max_new_tokens} "
                       f"new tokens exceed the model's max_seq_len {limit} (use fewer shots)")
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_id)
  samples = rollout.generate(role, prompts, cfg, jax.random.key(0), batch_size=batch_size)
  texts = rollout.decode(samples, tokenizer)
  predictions, correct = [], 0
  for row, text in zip(rows, texts):
    output = text.split(stop)[0].strip() if stop else text
    hit = normalize(output) == normalize(row["answer"])
    correct += hit
    predictions.append({"line": row["line"], "prompt": row["prompt"], "answer": row["answer"],
                        "output": output, "correct": hit})
  return {"accuracy": correct / len(rows), "n": len(rows)}, predictions


def run_task(role: Role, tokenizer, rows: Sequence[dict], kind: str, output: str, *,
             shots: int = 0, demo_rows: Sequence[dict] | None = None, max_new_tokens: int = 16,
             stop: str = DEMO_SEPARATOR, batch_size: int = 16, info: dict | None = None) -> dict:
  """Scores a task and writes OUTPUT/metrics.json and OUTPUT/predictions.jsonl (atomically).

  Args:
    rows: the task's rows (`load_task`); without `demo_rows` the first `shots` of them are the
      demonstrations and are not scored.
    demo_rows: rows of the same kind to take the demonstrations from instead.
    info: extra fields for metrics.json (the task's file, the checkpoint).

  Returns:
    The metrics: accuracy (and accuracy_norm for multiple choice), n, shots, kind.
  """
  if shots < 0:
    raise ValueError(f"shots must be >= 0, got {shots}")
  pool = rows if demo_rows is None else demo_rows
  # Demonstrations from the task file itself must leave at least one row to score.
  available = len(pool) - 1 if demo_rows is None else len(pool)
  if shots > available:
    raise ValueError(f"{shots} shots: only {available} rows can be demonstrations")
  prefix = demonstrations(pool[:shots], kind)
  scored = list(rows[shots:] if demo_rows is None else rows)
  if kind == "multiple_choice":
    metrics, predictions = multiple_choice(role, tokenizer, scored, prefix, batch_size)
  elif kind == "generation":
    metrics, predictions = generation(role, tokenizer, scored, prefix, max_new_tokens, stop,
                                      batch_size)
  else:
    raise ValueError(f"unknown task kind {kind!r}; choose one of {KINDS}")
  metrics = dict(metrics, kind=kind, shots=shots, **(info or {}))
  if jax.process_index() == 0:
    os.makedirs(output, exist_ok=True)
    write_jsonl(os.path.join(output, "predictions.jsonl"), predictions)
    checkpoints.write_atomically(os.path.join(output, "metrics.json"),
                                 json.dumps(metrics, indent=2, sort_keys=True) + "\n")
  return metrics
