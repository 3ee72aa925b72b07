"""The README's two commands are the ones CI and users run."""

import os

ROOT = os.path.dirname(os.path.dirname(__file__))


def readme_commands() -> list[str]:
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = text.split("```bash\n")[1:3]
  return [block.split("```")[0].strip() for block in blocks]


def test_readme_opens_with_the_install_and_run_and_the_test_commands():
  main, tests = readme_commands()
  assert main.startswith("pip install -e .") and " && lm " in main
  assert tests.startswith('pip install -e ".[test') and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
  ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
  assert readme_commands()[1] in ci
