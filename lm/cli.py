"""The `lm` command: `lm VERB [--flag=value ...]`.

Each verb lives in `lm/commands/<verb>.py` with its own absl flags and a `main(argv)`; only the
chosen verb is imported, so verbs never see each other's flags.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app

from lm import allocator

VERBS = {
    "run": "run an experiment's stages (resumes an interrupted run)",
    "eval": "run a stage's evaluations on its output or on a model directory",
    "aot": "compile a stage's train step (and sampling) for a TPU slice; report per-chip memory",
    "chat": "talk to a chat model in the Llama 2 format, streaming replies",
    "sample": "generate from a checkpoint or a random model of a preset",
    "score": "reward-model scores of dialogues or preference pairs, on [0, 1]",
    "convert": "import a Meta or Hugging Face Llama checkpoint as a model directory",
    "export": "write a model directory as a Hugging Face Llama checkpoint",
    "pod": "run an experiment on every host of a Cloud TPU slice (or N local processes)",
}

# The verbs that run models on this host, where the allocator matters (`run` says it itself,
# once jax.distributed is set up: asking for the backend before that starts it too early).
COMPUTE_VERBS = ("eval", "chat", "sample", "score")

# Compiled programs are kept here between processes (JAX's persistent compilation cache), so a
# resumed run, a second chat session or a later stage with the same shapes skips compiling. Set
# JAX_COMPILATION_CACHE_DIR to put it elsewhere; `lm` leaves a value already set alone.
COMPILATION_CACHE = os.path.join("~", ".cache", "lm", "jax")
CACHED_VERBS = COMPUTE_VERBS + ("run",)


def usage() -> str:
  lines = ["usage: lm VERB [flags]   (lm VERB --help for the flags of a verb)", "", "verbs:"]
  lines += [f"  {verb:<10} {text}" for verb, text in VERBS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  as_program, argv = argv is None, sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  verb = argv[1]
  if verb not in VERBS:
    print(f"lm: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  if verb in CACHED_VERBS:
    tuned = allocator.tuned_environment(os.environ) if as_program else None
    if tuned is not None:  # glibc reads its settings at start-up only: start again with them
      os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], tuned)
    # Before the verb imports jax, which reads the variable once.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(COMPILATION_CACHE))
  module = importlib.import_module(f"lm.commands.{verb}")
  if verb in COMPUTE_VERBS and not {"-h", "--help", "--helpfull"} & set(argv):
    from lm import hardware  # noqa: PLC0415 (imports jax, which `lm --help` need not)
    advice = hardware.allocator_advice()
    if advice:
      print(advice, file=sys.stderr)
  verb_argv = [f"lm {verb}"] + argv[2:]
  if hasattr(module, "prepare_argv"):
    verb_argv = module.prepare_argv(verb_argv)
  app.run(module.main, argv=verb_argv)


if __name__ == "__main__":
  main()
