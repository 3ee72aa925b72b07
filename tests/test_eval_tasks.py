"""`lm eval` on user tasks: multiple-choice log-likelihoods and greedy generation against slow
references written here (a plain loop of full forward passes), the world's example tasks, bad
rows, and the command end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines import world
from lm import checkpoints, configs, model, roles, sharding
from lm import tokenizer as tok
from lm.evals import tasks

CFG = configs.get_preset("tiny", vocab_size=300, max_seq_len=128)
TOWNS = ["Velloran", "Tarn", "Osk", "Mirelde"]
NAMES = ["Mira", "Oskar", "Lune", "Bren", "Tova", "Kai"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_tasks")
  text = [f"{n} lives in {TOWNS[i % 4]}; {n} keeps a {['cat', 'fox'][i % 2]} ({i})."
          for i, n in enumerate(NAMES * 50)]
  tokenizer = tok.train_tokenizer(text, 300, root / "tokenizer.model")
  role = roles.create("policy", CFG, sharding.make_mesh(sharding.MeshConfig(fsdp=8)), seed=3)
  checkpoints.save_model(root / "model", role.params, CFG, tokenizer_path=tokenizer.path)
  return root, tokenizer, role


def write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def mc_rows():
  return [{"question": f"{n} lives in", "choices": TOWNS[i % 3:] + TOWNS[:i % 3],
           "answer": i % 4} for i, n in enumerate(NAMES)]


def reference_logits(role, tokens: list[int]) -> np.ndarray:
  """Logits [len(tokens), V] from one forward pass; the row is padded to max_seq_len after the
  tokens (causal: the padding changes nothing before it) so every call reuses one program."""
  padded = np.zeros((1, CFG.max_seq_len), np.int32)
  padded[0, :len(tokens)] = tokens
  forward = jax.jit(model.apply, static_argnums=0)
  return np.asarray(forward(role.graphdef, role.params, padded)[0][0, :len(tokens)], np.float64)


def reference_logprob(role, tokens: list[int], start: int) -> float:
  """log p(tokens[start:] | tokens[:start])."""
  logp = jax.nn.log_softmax(reference_logits(role, tokens), axis=-1)
  return float(sum(logp[t - 1, tokens[t]] for t in range(start, len(tokens))))


def test_multiple_choice_matches_a_loop_of_forward_passes(parts, tmp_path):
  _, tokenizer, role = parts
  kind, rows = tasks.load_task(write(tmp_path / "mc.jsonl", mc_rows()))
  assert kind == "multiple_choice"
  metrics = tasks.run_task(role, tokenizer, rows, kind, str(tmp_path / "out"), shots=2,
                           batch_size=8)
  prefix = "".join(f"{r['question']} {r['choices'][r['answer']]}\n" for r in rows[:2])
  predictions = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
  assert [p["line"] for p in predictions] == [3, 4, 5, 6]
  hits = hits_norm = 0
  for row, prediction in zip(rows[2:], predictions):
    context = tokenizer.encode(prefix + row["question"], bos=True)
    summed, per_token = [], []
    for choice in row["choices"]:
      continuation = tokenizer.encode(choice)
      summed.append(reference_logprob(role, context + continuation, len(context)))
      per_token.append(summed[-1] / len(continuation))
    np.testing.assert_allclose(prediction["logprobs"], summed, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prediction["logprobs_per_token"], per_token, rtol=1e-4, atol=1e-4)
    assert prediction["prediction"] == int(np.argmax(summed))
    hits += int(np.argmax(summed)) == row["answer"]
    hits_norm += int(np.argmax(per_token)) == row["answer"]
  on_disk = json.loads(open(tmp_path / "out" / "metrics.json").read())
  assert on_disk == metrics
  assert metrics["n"] == 4 and metrics["shots"] == 2
  assert metrics["accuracy"] == hits / 4 and metrics["accuracy_norm"] == hits_norm / 4


def reference_greedy(role, tokenizer, prompt: list[int], steps: int) -> str:
  """Greedy decoding by re-reading the whole sequence at every step (no KV cache)."""
  tokens = list(prompt)
  for _ in range(steps):
    tokens.append(int(np.argmax(reference_logits(role, tokens)[-1])))
    if tokens[-1] == tokenizer.eos_id:
      break
  answer = [t for t in tokens[len(prompt):] if t != tokenizer.eos_id]
  return tokenizer.decode(answer).strip().split("\n")[0].strip()


def test_generation_exact_match_against_a_greedy_loop(parts, tmp_path):
  _, tokenizer, role = parts
  prompts = [f"{n} lives in" for n in NAMES[:4]]
  demo = write(tmp_path / "demo.jsonl", [{"prompt": "Kai lives in", "answer": "Osk"}])
  outputs = [reference_greedy(role, tokenizer, tokenizer.encode(f"Kai lives in Osk\n{p}", True), 6)
             for p in prompts]
  # Rows 0 and 2 expect what the model says (in another case, with punctuation); 1 and 3 not.
  answers = [f" {outputs[0].upper()}. ", "Velloran" + outputs[1], f"{outputs[2]}!",
             "x" + outputs[3]]
  path = write(tmp_path / "gen.jsonl",
               [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
  kind, rows = tasks.load_task(path)
  _, demo_rows = tasks.load_task(demo, kind)
  metrics = tasks.run_task(role, tokenizer, rows, kind, str(tmp_path / "out"), shots=1,
                           demo_rows=demo_rows, max_new_tokens=6, batch_size=8)
  predictions = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
  assert [p["output"] for p in predictions] == outputs
  assert [p["correct"] for p in predictions] == [True, False, True, False]
  assert metrics["accuracy"] == 0.5 and metrics["n"] == 4 and metrics["kind"] == "generation"


def test_normalize():
  assert tasks.normalize("  The  Velloran.\n") == "the velloran"
  assert tasks.normalize(42) == "42"


def test_world_tasks_come_from_the_probes(tmp_path):
  probes = world.fact_probes(world.make_world(world.WorldConfig.preset("test")))
  write(tmp_path / "probes.jsonl", probes)
  generation = tasks.world_task(str(tmp_path), "facts_gen")
  assert generation == [{"prompt": p["prompt"], "answer": p["answer"]} for p in probes]
  mc = tasks.world_task(str(tmp_path), "facts_mc")
  towns = {p["answer"] for p in probes if p["prompt"].endswith("lives in")}
  for probe, row in zip(probes, mc):
    assert row["question"] == probe["prompt"]
    assert row["choices"][row["answer"]] == probe["answer"]
    assert len(set(row["choices"])) == len(row["choices"]) == min(4, len(towns))
    if probe["prompt"].endswith("lives in"):
      assert set(row["choices"]) <= towns
  assert mc == tasks.world_task(str(tmp_path), "facts_mc")  # seeded
  write_path = tmp_path / "task.jsonl"
  tasks.write_jsonl(str(write_path), mc)
  assert tasks.load_task(str(write_path))[0] == "multiple_choice"
  with pytest.raises(FileNotFoundError, match="probes.jsonl does not exist"):
    tasks.world_task(str(tmp_path / "nowhere"), "facts_mc")
  with pytest.raises(ValueError, match="unknown world task 'facts'"):
    tasks.world_task(str(tmp_path), "facts")


GOOD_MC = {"question": "Mira lives in", "choices": ["Tarn", "Osk"], "answer": 0}


@pytest.mark.parametrize("bad, kind, reason", [
    ("{not json", None, "not valid JSON"),
    ('["a"]', None, "expected a JSON object, got list"),
    ({"question": "q", "choices": ["Tarn"], "answer": 0}, None, "at least 2 non-empty strings"),
    ({"question": "q", "choices": ["Tarn", ""], "answer": 0}, None, "at least 2 non-empty"),
    ({"question": "q", "choices": ["Tarn", "Osk"], "answer": 2}, None, "index into the 2 choices"),
    ({"question": "q", "choices": ["Tarn", "Osk"], "answer": True}, None, "index into"),
    ({"choices": ["Tarn", "Osk"], "answer": 0}, None, '"question": a string'),
    ({"prompt": "Mira lives in"}, "generation", '"answer": a string or number'),
    ({"prompt": " ", "answer": "Tarn"}, "generation", '"prompt": a non-empty string'),
    ({"prompt": "Mira lives in", "answer": "Tarn"}, "multiple_choice", '"question": a string'),
])
def test_bad_rows_name_file_line_and_reason(tmp_path, bad, kind, reason):
  good = GOOD_MC if kind != "generation" else {"prompt": "p", "answer": "a"}
  path = write(tmp_path / "task.jsonl", [good, "", bad])
  with pytest.raises(ValueError, match=rf"task.jsonl:3: .*{reason}"):
    tasks.load_task(path, kind)


def test_bad_arguments(parts, tmp_path):
  _, tokenizer, role = parts
  with pytest.raises(ValueError, match="unknown task kind 'mcq'"):
    tasks.load_task(write(tmp_path / "t.jsonl", [GOOD_MC]), "mcq")
  with pytest.raises(ValueError, match="no rows"):
    tasks.load_task(write(tmp_path / "empty.jsonl", [""]))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tasks.load_task(str(tmp_path / "missing.jsonl"))
  kind, rows = tasks.load_task(write(tmp_path / "t.jsonl", [GOOD_MC] * 3))
  with pytest.raises(ValueError, match="3 shots: only 2 rows can be demonstrations"):
    tasks.run_task(role, tokenizer, rows, kind, str(tmp_path / "o"), shots=3)
  long = dict(GOOD_MC, question="Mira lives in " * 80)
  kind, rows = tasks.load_task(write(tmp_path / "long.jsonl", [GOOD_MC, long]))
  with pytest.raises(ValueError, match="line 2: prompt and choice 'Tarn' take .* max_seq_len 128"):
    tasks.run_task(role, tokenizer, rows, kind, str(tmp_path / "o"))


def test_lm_eval_world_task_end_to_end(parts, tmp_path):
  root, _, _ = parts
  probes = [{"prompt": f"{n} lives in", "answer": TOWNS[i % 4]} for i, n in enumerate(NAMES)]
  write(tmp_path / "probes.jsonl", probes)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "lm.cli", "eval", f"--checkpoint={root / 'model'}",
       "--task=world:facts_mc", f"--world={tmp_path}", "--shots=2",
       f"--output={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.loads(open(tmp_path / "out" / "metrics.json").read())
  assert metrics["n"] == 4 and 0 <= metrics["accuracy"] <= 1 and "accuracy_norm" in metrics
  assert metrics["task"] == str(tmp_path / "out" / "task.jsonl")
  assert len(open(tmp_path / "out" / "predictions.jsonl").readlines()) == 4
  assert json.loads(result.stdout) == metrics
  bad = subprocess.run(
      [sys.executable, "-m", "lm.cli", "eval", f"--checkpoint={root / 'model'}",
       "--task=world:facts_mc", f"--output={tmp_path / 'out'}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode != 0 and "needs --world=DIR" in bad.stderr
