"""Where metrics go: TensorBoard event files and an append-only JSONL log per stage.

On resume the JSONL log drops rows past the restored step, so a run killed and resumed has
exactly one row per step, the same rows as an uninterrupted run.
"""

from __future__ import annotations

import json
import os

import jax

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
  """Writes `{"step", "kind", **metrics}` rows to WORKDIR/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      kept = [line for line in open(self.path) if line.strip() and
              json.loads(line)["step"] <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "events"))

  def write(self, step: int, metrics: dict, prefix: str) -> None:
    """One row of the scalars in `metrics` (lists, e.g. adherence by turn, go to metrics.json)."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items() if not isinstance(v, (list, tuple, dict))}
    row = {"step": step, "kind": prefix, **scalars}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{key}", float(value), step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_rows(workdir: str, kind: str | None = None) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows = [json.loads(line) for line in open(path) if line.strip()]
  return [r for r in rows if kind is None or r["kind"] == kind]
