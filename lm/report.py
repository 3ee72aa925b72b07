"""The run report: DIR/report.md with every stage's final metrics and a loss curve per stage."""

from __future__ import annotations

import json
import os

from lm import checkpoints, metrics_io
from lm.stages import common


def plot_curve(rows: list[dict], path: str, title: str) -> bool:
  """Training loss (and eval loss if logged) against step, as a PNG. False if nothing to plot."""
  train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and "loss" in r]
  evals = [(r["step"], r["loss"]) for r in rows if r["kind"] == "eval" and "loss" in r]
  if not train:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(*zip(*train), label="train")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  ax.legend()
  save_png(fig, path)
  return True


def save_png(fig, path: str) -> None:
  """Writes a matplotlib figure atomically and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=100)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def _format(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def write_report(workdir: str, stages: list[str]) -> str:
  lines = ["# Run report", ""]
  for name in stages:
    directory = os.path.join(workdir, name)
    metrics = common.read_metrics(directory) or {}
    lines += [f"## {name}", ""]
    if metrics:
      lines += ["| metric | value |", "|---|---|"]
      lines += [f"| {k} | {_format(v)} |" for k, v in sorted(metrics.items())
                if not isinstance(v, (list, dict)) or len(json.dumps(v)) < 200]
      lines.append("")
    extra = os.path.join(directory, "report.md")
    if os.path.exists(extra):  # a stage's own tables (e.g. adherence by turn)
      lines += [open(extra).read().strip(), ""]
    png = os.path.join(directory, "loss.png")
    if plot_curve(metrics_io.read_rows(directory), png, f"{name}: loss"):
      lines += [f"![{name} loss]({name}/loss.png)", ""]
  path = os.path.join(workdir, "report.md")
  checkpoints.write_atomically(path, "\n".join(lines) + "\n")
  return path
