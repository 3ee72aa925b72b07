"""The `world` stage: writes the synthetic "Llama 2 in miniature" world's data (no training).

Config: size ("test", "tiny", "small"). Output: the files listed in data_pipelines/world/.
"""

from __future__ import annotations

import dataclasses

from data_pipelines import world


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "world"
  size: str = "tiny"


def run(cfg: Config, ctx) -> dict:
  summary = world.write_world(ctx.directory, world.WorldConfig.preset(cfg.size, seed=ctx.seed))
  return {k: v for k, v in summary.items() if k != "config"}
