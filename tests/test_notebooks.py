"""Every notebook in notebooks/ runs top to bottom in a Jupyter kernel, on a reduced setting.

Each notebook has one cell tagged `parameters` (preset, workdir, config overrides, lengths); the
test puts a cell after it with the values below, as papermill does, so the notebook's own code
runs unchanged on a handful of steps of every stage. The chat notebooks share one workdir, in the
order below, so each reuses the stages the one before it finished (the pipeline skips a stage with
metrics.json), as a user running them in turn does. They only have to run: what the stages learn
is tested in test_pipeline.py and the stage tests.
"""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
ORDER = ("quickstart", "chat_and_gatt", "reward_models", "rlhf", "convert_and_sample")

# A few steps of every stage, a few prompts and tokens, on the test world.
CHAT_STEPS = {
    "stages.world.size": "test",
    "stages.pretrain.train.steps": 3,
    "stages.pretrain.train.batch_size": 4,
    "stages.pretrain.train.log_every": 1,
    "stages.pretrain.train.checkpoint_every": 3,
    "stages.pretrain.data.eval_batches": 1,
    # Enough SFT steps that most answers end with EOS: GAtt and rejection sampling keep only
    # finished answers.
    "stages.sft.train.steps": 30,
    "stages.sft.train.batch_size": 4,
    "stages.sft.train.log_every": 10,
    "stages.sft.data.eval_batches": 1,
}
GATT = {
    "stages.gatt.train.steps": 2,
    "stages.gatt.train.log_every": 1,
    "stages.gatt.train.batch_size": 4,
    "stages.gatt.data.keep_only_adherent": False,  # an instruction kept at once is not learnt yet
    "stages.gatt.sampling.max_new_tokens": 16,
    "stages.gatt.sampling.samples_per_dialogue": 1,
    "stages.gatt.sampling.batch_size": 8,
    "stages.gatt.eval.max_new_tokens": 8,
    "stages.gatt.eval.batch_size": 8,
    "stages.gatt.data.eval_batches": 1,
}
REWARD = {f"stages.{rm}.{k}": v for rm in ("rm_helpful", "rm_safety") for k, v in
          {"epochs": 0.01, "train.batch_size": 4, "train.log_every": 1,
           "eval_batch_size": 16}.items()}
RLHF = {
    "stages.rs_v1.data.max_prompts": 8,
    "stages.rs_v1.sampling.samples_per_prompt": 2,
    "stages.rs_v1.sampling.temperatures": (),
    "stages.rs_v1.sampling.max_new_tokens": 8,
    "stages.rs_v1.sampling.batch_size": 16,
    "stages.rs_v1.sampling.chunk_prompts": 8,
    "stages.rs_v1.eval.max_prompts": 8,
    "stages.rs_v1.eval.max_new_tokens": 8,
    "stages.rs_v1.eval.batch_size": 16,
    "stages.rs_v1.train.steps": 2,
    "stages.rs_v1.train.batch_size": 1,  # 8 prompts pack into one row
    "stages.rs_v1.train.log_every": 1,
    "stages.rs_v1.data.eval_batches": 1,
    "stages.ppo.data.max_prompts": 8,
    "stages.ppo.ppo.iterations": 2,
    "stages.ppo.ppo.prompts_per_iteration": 4,
    "stages.ppo.ppo.minibatch_size": 4,
    "stages.ppo.rollout.max_new_tokens": 8,
    "stages.ppo.rollout.batch_size": 4,
    "stages.ppo.rollout.scoring_batch_size": 4,
    "stages.ppo.reward.batch_size": 4,
    "stages.ppo.eval.every": 0,
    "stages.ppo.eval.max_prompts": 8,
    "stages.ppo.eval.max_new_tokens": 8,
    "stages.ppo.eval.batch_size": 8,
    "stages.ppo.eval.samples_per_prompt": 1,
}


def parameters(name: str, workdir: str) -> str:
  """The cell the test puts after the notebook's parameters cell."""
  chat = os.path.join(workdir, "chat")
  values = {
      "quickstart": dict(PRESET="tiny", WORKDIR=os.path.join(workdir, "quickstart"),
                         OVERRIDES={k: v for k, v in CHAT_STEPS.items() if "sft" not in k},
                         MAX_NEW_TOKENS=4),
      "chat_and_gatt": dict(PRESET="test", WORKDIR=chat, OVERRIDES={**CHAT_STEPS, **GATT},
                            GATT_DIALOGUES=4, EVAL_CONVERSATIONS=2, EVAL_TURNS=2,
                            MAX_NEW_TOKENS=8),
      "reward_models": dict(PRESET="test", WORKDIR=chat, OVERRIDES={**CHAT_STEPS, **REWARD}),
      "rlhf": dict(PRESET="test", WORKDIR=chat, OVERRIDES={**CHAT_STEPS, **REWARD, **RLHF}),
      "convert_and_sample": dict(WORKDIR=os.path.join(workdir, "convert"), MAX_NEW_TOKENS=4),
  }[name]
  return "# Set by tests/test_notebooks.py\n" + "\n".join(
      f"{key} = {value!r}" for key, value in values.items())


def execute(name: str, workdir: str):
  nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}: one cell must be tagged 'parameters', found {len(tagged)}"
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters(name, workdir)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # one CPU device, as in Colab or on a laptop
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails
  return nb


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("notebooks"))


@pytest.mark.parametrize("name", ORDER)
def test_notebook_runs_top_to_bottom(name, workdir):
  nb = execute(name, workdir)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.output_type == "error"]
  assert not errors
  pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
  assert pictures, f"{name} showed no picture"


def test_every_notebook_is_listed_and_committed_without_outputs():
  found = sorted(f[:-len(".ipynb")] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
  assert found == sorted(ORDER)
  readme = open(os.path.join(ROOT, "README.md")).read()
  for name in ORDER:
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (
            f"{name}.ipynb is committed with outputs: clear them (e.g. `jupyter nbconvert "
            f"--clear-output --inplace notebooks/{name}.ipynb`)")
    assert f"notebooks/{name}.ipynb" in readme, f"README does not link {name}.ipynb"
    assert "colab.research.google.com" in nb.cells[0].source
    assert "pip" in nb.cells[1].source, f"{name}: the second cell must install the package"
