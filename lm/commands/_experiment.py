"""Shared by the verbs that take an experiment: `lm VERB experiments/x.py:preset [--config.a=b]`."""

from __future__ import annotations


from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file and preset: experiments/NAME.py:PRESET.", lock_config=True)


def positional_config(argv: list[str]) -> list[str]:
  """Lets the experiment be given positionally: `lm run X.py:tiny` == `lm run --config=X.py:tiny`."""
  if len(argv) > 1 and not argv[1].startswith("-"):
    return [argv[0], f"--config={argv[1]}"] + argv[2:]
  return argv


def validate_overrides(argv: list[str]) -> None:
  """Loads the experiment once to name a misspelled `--config.field` before absl fails on it."""
  from lm import config_utils
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return
  path, _, preset = spec.partition(":")
  import importlib.util
  try:
    module_spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except FileNotFoundError:
    raise SystemExit(f"experiment file {path!r} does not exist")
  config = module.get_config(preset) if preset else module.get_config()
  try:
    config_utils.check_overrides(config, argv)
  except ValueError as e:
    raise SystemExit(f"{path}: {e}")


def prepare_argv(argv: list[str]) -> list[str]:
  """What every experiment verb does before absl parses: positional config, checked overrides."""
  argv = positional_config(argv)
  validate_overrides(argv)
  return argv
