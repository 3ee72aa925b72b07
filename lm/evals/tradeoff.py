"""The safety / helpfulness trade-off across models (LLAMA2.md §8.3-8.4): a table with one
column per model and a plot of safety, helpfulness and false refusals against a number per
model (the share of safety data in Figure 15) or the models in order (the stages of the recipe).
"""

from __future__ import annotations

import os

# (label, metric) rows of the table; the per-category safe rates follow the overall one.
ROWS = (("gold safe-response rate", "gold_safe_rate"),
        ("safe by the safety RM (score >= 0.5)", "rm_safe_rate"),
        ("safety RM on adversarial prompts", "rm_safety_on_safety"),
        ("false refusals, look-alikes", "false_refusal_rate_lookalikes"),
        ("refusals of helpful prompts", "refusal_rate_helpful"),
        ("helpfulness RM on helpful prompts", "rm_helpful_on_helpful"),
        ("gold helpfulness", "gold_helpful"))
SUMMARY_KEYS = frozenset(key for _, key in ROWS)


def _categories(results: dict[str, dict]) -> list[str]:
  return sorted({k for figures in results.values() for k in figures
                 if k.startswith("gold_safe_rate_")})


def report(name: str, directory: str, results: dict[str, dict], x: list[float],
           x_label: str) -> str:
  """`results` {label: held-out figures} -> the stage's report.md section; writes
  tradeoff.png beside it."""
  plot(results, x, x_label, os.path.join(directory, "tradeoff.png"), name)
  labels = list(results)
  head = [f"| | {' | '.join(labels)} |", "|---" * (len(labels) + 1) + "|"]
  if x:
    head.append(f"| {x_label or 'x'} | " + " | ".join(f"{v:g}" for v in x) + " |")
  rows = [ROWS[0]] + [(f"  {k.removeprefix('gold_safe_rate_').replace('_', ' ')}", k)
                      for k in _categories(results)] + list(ROWS[1:])
  lines = ["### Held-out prompts without a preprompt, model by model (greedy replies)\n", *head]
  for label, key in rows:
    cells = [f"{results[m][key]:.3f}" if key in results[m] else "-" for m in labels]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  prompts = next(iter(results.values()))
  lines.append(f"\n{prompts.get('gold_safety_prompts', 0)} adversarial and "
               f"{prompts.get('gold_helpful_prompts', 0)} answer-labelled helpful prompts; "
               f"false refusals by the world's refusal phrasings.\n")
  lines.append(f"![safety, helpfulness and false refusals]({name}/tradeoff.png)\n")
  return "\n".join(lines)


def plot(results: dict[str, dict], x: list[float], x_label: str, path: str, name: str) -> None:
  """Three panels, as Figure 15: safety (gold safe rate, mean safety RM score), helpfulness
  (helpfulness RM, gold), false refusals (look-alikes, helpful prompts), each against `x` or the
  models in order; a PNG written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = list(results)
  at = list(x) if x else list(range(len(labels)))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  panels = (("safety", (("gold_safe_rate", "gold safe rate"),
                        ("rm_safety_on_safety", "mean safety RM score"))),
            ("helpfulness", (("rm_helpful_on_helpful", "mean helpfulness RM score"),
                             ("gold_helpful", "gold helpfulness"))),
            ("false refusals", (("false_refusal_rate_lookalikes", "look-alikes"),
                                ("refusal_rate_helpful", "helpful prompts"))))
  for ax, (title, lines) in zip(axes, panels):
    for key, label in lines:
      ax.plot(at, [results[m].get(key, float("nan")) for m in labels], "o-", label=label)
    ax.set_title(f"{name}: {title}", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    if x:
      ax.set_xlabel(x_label)
    else:
      ax.set_xticks(at, labels, rotation=30, fontsize=7)
  from lm.report import save_png
  save_png(fig, path)
