"""The `world` stage: writes the synthetic "Llama 2 in miniature" world's data (no training).

Config: size ("test", "tiny", "small"). Output: the files of data_pipelines/world.py.
"""

from __future__ import annotations

from data_pipelines import world


def run(cfg, ctx) -> dict:
  summary = world.write_world(ctx.directory, world.WorldConfig.preset(cfg.size, seed=ctx.seed))
  return {k: v for k, v in summary.items() if k != "config"}
