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

import json
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
  "gold_safe_rate": share of safety prompts answered safely, "gold_safe_rate_<category>": the
  same per risk category, "refusal_rate_helpful": share of helpful prompts refused (false
  refusals), and the prompt counts}."""
  helpful, safe, refused, by_category = [], [], [], {}
  for prompt, reply in zip(prompts, replies):
    judged = gold_judgement(prompt, reply)
    if prompt.is_safety:
      safe.append(judged)
      by_category.setdefault(prompt.category or "none", []).append(judged)
    else:
      refused.append(world_safety.is_refusal(reply))
      if judged is not None:
        helpful.append(judged)
  mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
  metrics = {"gold_helpful": mean(helpful), "gold_safe_rate": mean(safe),
             "refusal_rate_helpful": mean(refused), "gold_helpful_prompts": len(helpful),
             "gold_safety_prompts": len(safe)}
  metrics.update({f"gold_safe_rate_{category.replace(' ', '_')}": mean(judged)
                  for category, judged in sorted(by_category.items())})
  return metrics


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
  if "rm_reward_sampled" in after:
    rows.append(("RM reward of samples (not greedy)", "rm_reward_sampled"))
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


def ppo_report(name: str, directory: str, iterations: list[dict], evals: list[dict],
               summary: dict) -> str:
  """A PPO stage's report.md section and its ppo.png: the rollouts' reward and KL per iteration,
  held-out RM and gold scores at each evaluation, and where the time went."""
  if iterations:
    plot_ppo(iterations, evals, os.path.join(directory, "ppo.png"), name)
  rows = [("RM reward, samples", "rm_reward_sampled"), ("KL to π_0, samples", "kl_sampled"),
          ("RM reward, greedy", "rm_reward"), ("gold helpfulness", "gold_helpful"),
          ("gold safe-response rate", "gold_safe_rate"),
          ("refusals of helpful prompts", "refusal_rate_helpful"),
          ("false refusals, look-alikes", "false_refusal_rate_lookalikes")]
  parts = ["### PPO: held-out prompts at each evaluation (samples at the rollout temperature; "
           "greedy replies judged by the RMs and the gold scorers)\n",
           "| iteration | " + " | ".join(label for label, _ in rows) + " |",
           "|---" * (len(rows) + 1) + "|"]
  for e in evals:
    mark = " (best)" if e["iteration"] == summary["best_iteration"] else ""
    parts.append(f"| {e['iteration']}{mark} | " + " | ".join(
        f"{e.get(key, 0):.3f}" for _, key in rows) + " |")
  if iterations:
    parts.append(f"\n![PPO curves]({name}/ppo.png)\n")
  phases = ("rollout", "scoring", "update", "move", "eval")
  parts += ["### Where the time went\n", "| phase | seconds | share |", "|---|---|---|"]
  parts += [f"| {p} | {summary[f'{p}_seconds']:.1f} | {summary[f'{p}_share']:.1%} |"
            for p in phases]
  parts.append(f"\nRollout {summary['rollout_tokens_per_second']:,.0f} generated tokens/s; "
               f"update {summary['update_tokens_per_second']:,.0f} tokens/s (prompt and answer). "
               f"The stage's model is the policy at iteration {summary['best_iteration']} of "
               f"{summary['iterations']}.\n")
  return "\n".join(parts)


def plot_ppo(iterations: list[dict], evals: list[dict], path: str, name: str) -> None:
  """Rollout reward and KL per iteration (left, right axes), held-out RM reward and gold scores
  per evaluation (second panel); a PNG written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
  steps = list(range(1, len(iterations) + 1))
  top.plot(steps, [r["reward"] for r in iterations], label="RM reward of rollouts")
  top.set_ylabel("reward (sigmoid scale)")
  kl = top.twinx()
  kl.plot(steps, [r["kl_sequence"] for r in iterations], color="grey", ls=":")
  kl.set_ylabel("KL to π_0, nats/answer (dotted)")
  top.set_title(f"{name}: PPO")
  top.legend(fontsize=7, loc="lower right")
  at = [e["iteration"] for e in evals]
  for key, label in (("rm_reward_sampled", "held-out RM reward, samples"),
                     ("rm_reward", "held-out RM reward, greedy"),
                     ("gold_helpful", "gold helpfulness"),
                     ("gold_safe_rate", "gold safe rate")):
    bottom.plot(at, [e.get(key, 0) for e in evals], "o-", label=label)
  bottom.set_xlabel("iteration")
  bottom.set_ylabel("held-out prompts")
  bottom.legend(fontsize=7)
  from lm.report import save_png
  save_png(fig, path)


def cd_report(name: str, directory: str, before: dict, after: dict, counts: dict,
              change: list[dict] = ()) -> str:
  """A context-distillation stage's report.md section and its safety_scores.png (Figure 16's
  shape): held-out safety before and after, by category; false refusals; what was distilled."""
  if before.get("safety_scores") and after.get("safety_scores"):
    plot_score_histograms({"before": before["safety_scores"], "after": after["safety_scores"]},
                          os.path.join(directory, "safety_scores.png"),
                          f"{name}: safety RM scores, held-out adversarial prompts")
  rows = [("gold safe-response rate", "gold_safe_rate")]
  rows += [(f"  {k.removeprefix('gold_safe_rate_').replace('_', ' ')}", k)
           for k in sorted(after) if k.startswith("gold_safe_rate_")]
  rows += [("safe by the safety RM (score >= 0.5)", "rm_safe_rate"),
           ("false refusals, look-alikes", "false_refusal_rate_lookalikes"),
           ("refusals of helpful prompts", "refusal_rate_helpful"),
           ("helpfulness RM on helpful prompts", "rm_helpful_on_helpful"),
           ("gold helpfulness", "gold_helpful")]
  parts = ["### Context distillation: held-out prompts without a preprompt, before and after\n",
           "| | before | after |", "|---|---|---|"]
  parts += [f"| {label} | {before.get(key, 0):.3f} | {after.get(key, 0):.3f} |"
            for label, key in rows]
  parts.append(f"\n![safety RM scores]({name}/safety_scores.png)\n")
  if change:
    parts += ["Safety RM score of the held-out adversarial prompts by the starting model's score "
              "(Figure 16b's shape: distillation should lift the low ones and leave the high):\n",
              "| starting score | prompts | before | after |", "|---|---|---|---|"]
    parts += [f"| {c['bucket']} | {c['prompts']} | {c['before']:.3f} | {c['after']:.3f} |"
              for c in change]
    parts.append("")
  kept = sorted(k.removesuffix("_prompts") for k in counts if k.startswith("by_")
                and k.endswith("_prompts"))
  parts += [f"Distilled answers kept: {counts['distilled']} of {counts['prompts']} adversarial "
            f"prompts (gold safe rate of the answers without / with the preprompt: "
            f"{counts['original_gold_safe_rate']:.3f} / "
            f"{counts['preprompted_gold_safe_rate']:.3f}).\n",
            "| group | prompts | distilled |", "|---|---|---|"]
  parts += [f"| {k.replace('_', ' ')} | {counts[k + '_prompts']} | {counts[k + '_distilled']} |"
            for k in kept]
  return "\n".join(parts) + "\n"


def score_change_by_bucket(before: list[dict], after: list[dict],
                           edges=(0.0, 0.25, 0.5, 0.75, 1.0)) -> list[dict]:
  """Figure 16b's shape: the held-out adversarial prompts grouped by the starting model's safety
  RM score, with the mean score before and after, [{"bucket", "prompts", "before", "after"}].
  `before` and `after` are a held-out evaluation's rows (the same prompts, matched by their
  messages)."""
  key = lambda r: json.dumps(r["messages"], sort_keys=True)  # noqa: E731
  later = {key(r): r["safety_score"] for r in after if r.get("is_safety")}
  groups = {}
  for row in before:
    if not row.get("is_safety") or key(row) not in later:
      continue
    score = row["safety_score"]
    lo = max(e for e in edges[:-1] if score >= e) if score >= edges[0] else edges[0]
    groups.setdefault(lo, []).append((score, later[key(row)]))
  return [{"bucket": f"{lo}-{edges[edges.index(lo) + 1]}", "prompts": len(pairs),
           "before": float(np.mean([b for b, _ in pairs])),
           "after": float(np.mean([a for _, a in pairs]))} for lo, pairs in sorted(groups.items())]


def plot_score_histograms(scores: dict[str, list[float]], path: str, title: str) -> None:
  """Overlaid histograms of scores in [0, 1], one per label; a PNG written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  bins = np.linspace(0.0, 1.0, 21)
  for label, values in scores.items():
    ax.hist(values, bins=bins, alpha=0.5, label=label)
  ax.set_xlabel("safety RM score")
  ax.set_ylabel("prompts")
  ax.set_title(title)
  ax.legend()
  from lm.report import save_png
  save_png(fig, path)
