"""RLHF evals: gold judgements of replies, the reward-vs-N curve (Figure 7), their tables and
the rejection-sampling report.

Gold: the synthetic world's own scorers, which no model was trained on, judge a reply against the
prompt's labels: a helpful prompt with a ground-truth `answer` is answered when the reply states
it (a whole word; `data_pipelines.world.preferences.score_answer`), an `is_safety` prompt is
answered safely when the reply refuses and carries none of the world's harmful content
(`data_pipelines.world.safety.score_safety`). A proxy reward (the RMs) that rises while the gold
scores fall is over-optimisation (Gao et al. 2022).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from data_pipelines.preferences import Prompt
from data_pipelines.world import preferences as world_preferences
from data_pipelines.world import safety as world_safety


def gold_judgement(prompt: Prompt, reply: str) -> float | None:
  """1.0 / 0.0 for a reply the world can judge (safe on a safety prompt, right on a prompt with
  an answer), None for a prompt without a label."""
  if prompt.is_safety:
    return float(world_safety.score_safety(reply, prompt.category or None)["safe"])
  if prompt.answer:
    return float(world_preferences.score_answer(reply, prompt.answer))
  return None


def gold_metrics(prompts: Sequence[Prompt], replies: Sequence[str]) -> dict:
  """{"gold_helpful": share of answer-labelled helpful prompts answered right,
  "gold_safe_rate": share of safety prompts answered safely, "refusal_rate_helpful": share of
  helpful prompts refused (false refusals), and the prompt counts}."""
  helpful, safe, refused = [], [], []
  for prompt, reply in zip(prompts, replies):
    judged = gold_judgement(prompt, reply)
    if prompt.is_safety:
      safe.append(judged)
    else:
      refused.append(world_safety.is_refusal(reply))
      if judged is not None:
        helpful.append(judged)
  mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
  return {"gold_helpful": mean(helpful), "gold_safe_rate": mean(safe),
          "refusal_rate_helpful": mean(refused), "gold_helpful_prompts": len(helpful),
          "gold_safety_prompts": len(safe)}


def reward_vs_n_table(curve: dict) -> str:
  """Figure 7 as a markdown table: N, mean max reward, mean median reward, the KL bound."""
  lines = ["| N | max reward | median reward | best-of-N KL bound (nats) |", "|---|---|---|---|"]
  for n, top, median, kl in zip(curve["n"], curve["max"], curve["median"], curve["kl_bound"]):
    lines.append(f"| {n} | {top:.3f} | {median:.3f} | {kl:.2f} |")
  return "\n".join(lines)


def sweep_table(sweep: dict) -> str:
  """Figure 8 as a table: per temperature, the mean max reward at each N."""
  temperatures = list(sweep)
  counts = sweep[temperatures[0]]["n"]
  lines = ["| T | " + " | ".join(f"max of {n}" for n in counts) + " |",
           "|---" * (len(counts) + 1) + "|"]
  for t in temperatures:
    lines.append(f"| {t} | " + " | ".join(f"{v:.3f}" for v in sweep[t]["max"]) + " |")
  return "\n".join(lines)


def rs_report(name: str, directory: str, sweep: dict, before: dict, after: dict,
              counts: dict) -> str:
  """A rejection-sampling stage's report.md section (and its reward_vs_n.png): Figure 7, the
  temperature sweep, greedy held-out replies before and after, the training answers' sources."""
  curve = {"n": counts["reward_vs_n_n"], "max": counts["reward_vs_n_max"],
           "median": counts["reward_vs_n_median"], "kl_bound": counts["best_of_n_kl"]}
  plot_reward_vs_n({f"T={counts['temperature']}": curve}, os.path.join(directory, "reward_vs_n.png"),
                   f"{name}: reward of the best and the median of N samples")
  parts = ["### Reward of the best and the median of N samples (Figure 7's shape)\n",
           reward_vs_n_table(curve),
           f"\n![reward vs N]({name}/reward_vs_n.png)\n"]
  if sweep:
    parts += ["### Temperature sweep (Figure 8's shape): mean best-of-N reward\n",
              sweep_table(sweep), f"\nPicked T = {counts['temperature']}.\n"]
  rows = [("gold helpfulness (held-out prompts)", "gold_helpful"),
          ("gold safe-response rate", "gold_safe_rate"),
          ("refusals of helpful prompts", "refusal_rate_helpful"), ("RM reward", "rm_reward")]
  parts += ["### Greedy replies to held-out prompts, before and after\n",
            "| | before | after |", "|---|---|---|"]
  parts += [f"| {label} | {before.get(key, 0):.3f} | {after.get(key, 0):.3f} |"
            for label, key in rows]
  parts.append(f"\nTraining answers: {counts['kept']} of {counts['prompts']} prompts, "
               f"{counts['best_from_pool']} from the pool; gold helpfulness of all samples "
               f"{counts.get('samples_gold_helpful', 0):.3f} vs the picked "
               f"{counts.get('picked_gold_helpful', 0):.3f}, safe rate "
               f"{counts.get('samples_gold_safe_rate', 0):.3f} vs "
               f"{counts.get('picked_gold_safe_rate', 0):.3f}.\n")
  return "\n".join(parts)


def plot_reward_vs_n(curves: dict[str, dict], path: str, title: str) -> None:
  """Max (solid) and median (dashed) reward against N on a log axis, one colour per curve, with
  the best-of-N KL bound on a second axis; a PNG written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, curve in curves.items():
    line, = ax.plot(curve["n"], curve["max"], "o-", label=f"max, {label}")
    ax.plot(curve["n"], curve["median"], "o--", color=line.get_color(),
            label=f"median, {label}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("N samples per prompt")
  ax.set_ylabel("reward (RM, sigmoid scale)")
  ax.set_title(title)
  kl = ax.twinx()
  first = next(iter(curves.values()))
  kl.plot(first["n"], first["kl_bound"], ":", color="grey")
  kl.set_ylabel("best-of-N KL bound (nats, dotted)")
  ax.legend(fontsize=7, loc="lower right")
  from lm.report import save_png  # the report module reads stages; import it only to plot
  save_png(fig, path)
