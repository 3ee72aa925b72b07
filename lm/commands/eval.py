"""`lm eval`: a stage's evaluations, or a user task from JSONL on a model directory.

  lm eval experiments/pretrain.py:tiny --workdir=/tmp/run --stage=pretrain
  lm eval experiments/pretrain.py:tiny --workdir=/tmp/run --checkpoint=/tmp/other/pretrain
  lm eval --checkpoint=/tmp/run/pretrain --task=mc.jsonl --shots=3 --output=/tmp/eval_mc
  lm eval --checkpoint=/tmp/run/pretrain --task=world:facts_gen --world=/tmp/run/world \
      --output=/tmp/eval_facts

The first form runs the evaluations the stage runs at its end, on the stage's own output or on
any model directory, and prints them as JSON. The second scores a task file (lm/evals/tasks.py
gives the row formats: multiple choice {"question", "choices", "answer"}, generation {"prompt",
"answer"}) and writes OUTPUT/metrics.json (accuracy, n) and OUTPUT/predictions.jsonl;
`world:facts_mc` and `world:facts_gen` build example tasks from a world's fact probes (written to
OUTPUT/task.jsonl).
"""

from __future__ import annotations

import json
import os

from absl import flags

from lm.commands import _experiment

WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (for earlier stages' outputs).")
STAGE = flags.DEFINE_string("stage", None, "The stage whose evals to run (default: the last).")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (default: the stage's).")
TASK = flags.DEFINE_string("task", None, "A task JSONL file, or world:facts_mc / world:facts_gen.")
TASK_KIND = flags.DEFINE_enum("task_kind", None, ["multiple_choice", "generation"],
                              "The task's kind (default: multiple_choice when rows have choices).")
SHOTS = flags.DEFINE_integer("shots", 0, "Demonstrations before each question.")
SHOTS_FILE = flags.DEFINE_string("shots_file", None,
                                 "Take demonstrations from this file (default: the task's first "
                                 "rows, which are then not scored).")
OUTPUT = flags.DEFINE_string("output", None, "Where metrics.json and predictions.jsonl go.")
WORLD = flags.DEFINE_string("world", None, "The world directory that world: tasks read.")
TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                "SentencePiece model (default: CHECKPOINT/tokenizer.model).")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Generation tasks: tokens per answer.")
STOP = flags.DEFINE_string("stop", "\\n", "Generation tasks: the answer ends at this string "
                           "(\\n and \\t are read as newline and tab).")
BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


prepare_argv = _experiment.prepare_argv


def _task_rows(output: str):
  """(kind, rows, source) of --task: a file, or a world example also written to OUTPUT."""
  from lm.evals import tasks
  if TASK.value.startswith("world:"):
    name = TASK.value.split(":", 1)[1]
    if WORLD.value is None:
      raise ValueError(f"--task={TASK.value} needs --world=DIR, a world directory (the world "
                       "stage's output, e.g. WORKDIR/world)")
    path = os.path.join(output, "task.jsonl")
    os.makedirs(output, exist_ok=True)
    tasks.write_jsonl(path, tasks.world_task(WORLD.value, name))
    kind, rows = tasks.load_task(path, tasks.WORLD_TASKS.get(name))
    return kind, rows, path
  kind, rows = tasks.load_task(TASK.value, TASK_KIND.value)
  return kind, rows, TASK.value


def run_task() -> dict:
  """The task mode: load the model and the task, score, write OUTPUT."""
  if CHECKPOINT.value is None or OUTPUT.value is None:
    raise ValueError("--task needs --checkpoint=MODEL_DIR and --output=DIR")
  import jax

  from lm import checkpoints, roles, sharding
  from lm.evals import tasks
  from lm.tokenizer import Tokenizer

  kind, rows, source = _task_rows(OUTPUT.value)
  demo_rows = None
  if SHOTS_FILE.value is not None:
    _, demo_rows = tasks.load_task(SHOTS_FILE.value, kind)
  tokenizer_path = TOKENIZER.value or os.path.join(CHECKPOINT.value, checkpoints.TOKENIZER_FILE)
  if not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f"no tokenizer at {tokenizer_path}; give --tokenizer=FILE")
  _, head = checkpoints.read_model_info(CHECKPOINT.value)
  if head != "lm":
    raise ValueError(f"{CHECKPOINT.value} holds a {head!r} model, not a language model")
  one_device = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  policy = roles.load("policy", CHECKPOINT.value, one_device, step=STEP.value)
  info = {"task": source, "checkpoint": CHECKPOINT.value}
  stop = STOP.value.replace("\\n", "\n").replace("\\t", "\t")
  return tasks.run_task(policy, Tokenizer(tokenizer_path), rows, kind, OUTPUT.value,
                        shots=SHOTS.value, demo_rows=demo_rows, max_new_tokens=MAX_NEW.value,
                        stop=stop, batch_size=BATCH.value, info=info)


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm eval: unexpected arguments {argv[1:]}")
  if TASK.value is not None:
    try:
      metrics = run_task()
    except (ValueError, FileNotFoundError) as e:
      raise SystemExit(f"lm eval: {e}")
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return
  if _experiment.CONFIG.value is None or WORKDIR.value is None:
    raise SystemExit("usage: lm eval EXPERIMENT.py:PRESET --workdir=DIR [--stage=NAME] "
                     "[--checkpoint=MODEL_DIR]\n"
                     "   or: lm eval --checkpoint=MODEL_DIR --task=FILE.jsonl --output=DIR "
                     "[--shots=K] [--task_kind=multiple_choice|generation]")
  from lm import pipeline
  try:
    metrics = pipeline.evaluate_stage(_experiment.CONFIG.value, WORKDIR.value, STAGE.value,
                                      CHECKPOINT.value)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"lm eval: {e}")
  print(json.dumps(metrics, indent=2, sort_keys=True))
