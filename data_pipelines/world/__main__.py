"""`python -m data_pipelines.world --out=DIR [--seed=0] [--size=tiny]`: writes the world's data
(the package docstring lists the files) and prints the counts per file."""

from __future__ import annotations

import argparse
import json

from data_pipelines import world


def main(argv=None):
  parser = argparse.ArgumentParser(description="Write the synthetic world's data.")
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", default="tiny")
  args = parser.parse_args(argv)
  summary = world.write_world(args.out, world.WorldConfig.preset(args.size, args.seed))
  print(json.dumps({k: v for k, v in summary.items() if k != "config"}))


if __name__ == "__main__":
  main()
