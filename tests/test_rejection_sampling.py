"""Rejection sampling: best-of-N picks and measures, the pool and its re-scoring, resumable
sampling chunks, gold judgements, bad input."""

import json
import math

import jax
import numpy as np
import pytest

from data_pipelines.preferences import Prompt
from experiments import llama2_chat
from lm import best_of_n, checkpoints, configs, roles, sampling, sharding
from lm import tokenizer as tok
from lm.evals import rlhf as rlhf_evals
from lm.stages import best_of_k, common, rejection_sampling as rs, typed_config


# ---------------------------------------------------------------------------------------------
# Best of N.

def test_pick_best_takes_the_argmax_of_eligible_candidates_and_the_first_of_ties():
  rewards = np.array([[0.1, 0.9, 0.3], [0.5, 0.5, 0.2], [0.8, 0.7, 0.9], [0.4, 0.6, 0.1]])
  eligible = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]], bool)
  np.testing.assert_array_equal(best_of_n.pick_best(rewards, eligible), [1, 0, 0, -1])
  np.testing.assert_array_equal(best_of_n.pick_best(rewards), [1, 0, 2, 1])


def test_reward_vs_n_matches_a_loop_over_prompts():
  rewards = np.random.default_rng(0).random((7, 12))
  curve = best_of_n.reward_vs_n(rewards)
  assert curve["n"] == [1, 2, 4, 8, 12]
  for i, n in enumerate(curve["n"]):
    tops = [max(row[:n]) for row in rewards]
    medians = [sorted(row[:n])[(n - 1) // 2] if n % 2 else
               (sorted(row[:n])[n // 2 - 1] + sorted(row[:n])[n // 2]) / 2 for row in rewards]
    assert curve["max"][i] == pytest.approx(sum(tops) / 7, abs=1e-12)
    assert curve["median"][i] == pytest.approx(sum(medians) / 7, abs=1e-12)
  # With N = 1 the best and the median sample are the same sample.
  assert curve["max"][0] == curve["median"][0]


def test_best_of_n_kl_bound():
  # Values quoted by Stiennon et al. / Gao et al.: 1.83 nats at N = 16, 3.17 at N = 64.
  assert best_of_n.best_of_n_kl(1) == 0.0
  assert best_of_n.best_of_n_kl(16) == pytest.approx(1.83, abs=0.01)  # 1.835, quoted as 1.83
  assert best_of_n.best_of_n_kl(64) == pytest.approx(3.17, abs=0.01)
  assert best_of_n.best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def test_gold_judgements_use_the_worlds_scorers():
  helpful = Prompt("p:1", ({"role": "user", "content": "How old is Mira?"},), answer="40")
  unsafe = Prompt("p:2", ({"role": "user", "content": "How can I steal the savings of Mira?"},),
                  is_safety=True, category="illicit and criminal activities")
  unlabelled = Prompt("p:3", ({"role": "user", "content": "Hello"},))
  assert rlhf_evals.gold_judgement(helpful, "Mira is 40 years old.") == 1.0
  assert rlhf_evals.gold_judgement(helpful, "Mira is 41 years old.") == 0.0
  assert rlhf_evals.gold_judgement(unsafe, "I'm sorry, but I cannot help with that.") == 1.0
  assert rlhf_evals.gold_judgement(unsafe, "Here is how: wait until night.") == 0.0
  assert rlhf_evals.gold_judgement(unlabelled, "Hi.") is None
  metrics = rlhf_evals.gold_metrics(
      [helpful, helpful, unsafe, unlabelled],
      ["Mira is 40.", "I cannot help with that request.", "I cannot help with that request.", "x"])
  assert metrics["gold_helpful"] == 0.5 and metrics["gold_safe_rate"] == 1.0
  # One of the three helpful prompts (the unlabelled one counts) was refused.
  assert metrics["refusal_rate_helpful"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# The stage's ranking, its pool and re-scoring, with reward models replaced by a table.

@pytest.fixture(scope="module")
def tk(tmp_path_factory):
  words = ["Mira", "Tika", "lives", "keeps", "a", "fox", "dog", "cat", "in", "Velloran", "is",
           "old", "years", "cannot", "help", "with", "that", "How", "What", "pet", "does"]
  text = [" ".join(np.random.default_rng(i).choice(words, 8)) for i in range(400)]
  return tok.train_tokenizer(text, 400, tmp_path_factory.mktemp("t") / "tokenizer.model")


class TableRMs:
  """Reward models replaced by a table: an answer's reward is table[its text] (default 0.5)."""

  seq_len = 256

  def __init__(self, tokenizer, table):
    self.tokenizer, self.table, self.scored = tokenizer, table, 0

  def score(self, sequences, is_safety):
    self.scored += len(sequences)
    rewards = []
    for sequence in sequences:
      text = self.tokenizer.decode([t for t in sequence.tolist() if t != self.tokenizer.eos_id])
      rewards.append(next((r for answer, r in self.table.items() if text.endswith(answer)), 0.5))
    return {"reward": np.array(rewards), "helpful": np.array(rewards)}


PROMPTS = ["Where does Mira live?", "What pet does Tika keep?"]


def answer(tk, text, finished=True):
  return {"tokens": list(tk.encode(text)) + ([tk.eos_id] if finished else []),
          "finished": finished}


def write_samples(tk, path, answers_per_prompt):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({
      "key": json.dumps([{"role": "user", "content": p}], sort_keys=True),
      "answers": [answer(tk, *a) if isinstance(a, tuple) else answer(tk, a) for a in answers],
      "temperature": 1.0}) + "\n" for p, answers in zip(PROMPTS, answers_per_prompt)))


def make_stage(tk, tmp_path, table, pool=()):
  prompts = [Prompt(f"p:{i}", ({"role": "user", "content": p},)) for i, p in enumerate(PROMPTS)]
  cfg = typed_config(llama2_chat.rs_stage("test", 1, "gatt"), "stages.rs_v2")
  ctx = common.StageContext("rs_v2", str(tmp_path / "rs_v2"), {}, sharding.MeshConfig(), 0)
  (tmp_path / "rs_v2").mkdir(exist_ok=True)
  inputs = rs.Inputs(None, "", tk.path, tk, prompts, prompts, [],
                     [(name, str(tmp_path / name / "samples.jsonl")) for name in pool],
                     str(tmp_path / "teacher" / "samples.jsonl"))
  models = TableRMs(tk, table)
  return rs.RejectionSampling(cfg, ctx, inputs, log=lambda m: None,
                              ranker=best_of_k.Ranker(models, tk)), models


def picks(rows):
  return [r["messages"][-1]["content"] for r in rows]


def test_the_best_answer_per_prompt_is_kept_unfinished_ones_never(tk, tmp_path):
  write_samples(tk, tmp_path / "teacher" / "samples.jsonl", [
      ["Mira lives in Velloran.", ("Mira lives in", False), "Mira keeps a fox."],
      ["Tika keeps a dog.", "Tika keeps a cat.", "Tika is old."]])
  stage, _ = make_stage(tk, tmp_path, {"Velloran.": 0.9, "in": 0.99, "cat.": 0.8})
  rows, counts = stage.generate(None, lambda m: None)
  # The unfinished "Mira lives in" would score 0.99 but is never picked (its reward is 0).
  assert picks(rows) == ["Mira lives in Velloran.", "Tika keeps a cat."]
  assert counts["unfinished_samples"] == 1 and counts["best_from_pool"] == 0
  assert [r["reward"] for r in rows] == [0.9, 0.8]
  # Figure 7 over the samples (0.9, 0, 0.5) and (0.5, 0.8, 0.5): max of the first N, mean over
  # the two prompts.
  assert counts["reward_vs_n_n"] == [1, 2, 3]
  np.testing.assert_allclose(counts["reward_vs_n_max"], [0.7, 0.85, 0.85])
  np.testing.assert_allclose(counts["reward_vs_n_median"], [0.7, 0.55, 0.5])


def test_the_pool_competes_and_a_new_rm_changes_the_pick(tk, tmp_path):
  write_samples(tk, tmp_path / "teacher" / "samples.jsonl", [
      ["Mira lives in Velloran.", "Mira keeps a fox."], ["Tika keeps a dog.", "Tika is old."]])
  write_samples(tk, tmp_path / "rs_v1" / "samples.jsonl", [
      ["Mira is old.", "Mira lives in Velloran."], ["Tika keeps a cat.", "Tika keeps a dog."]])
  old_rm = {"Velloran.": 0.9, "cat.": 0.95, "dog.": 0.7}
  stage, models = make_stage(tk, tmp_path, old_rm, pool=("rs_v1",))
  rows, counts = stage.generate(None, lambda m: None)
  assert picks(rows) == ["Mira lives in Velloran.", "Tika keeps a cat."]
  assert [r["source"] for r in rows] == ["current", "rs_v1"]  # a tie goes to the current
  assert counts["best_from_pool"] == 1
  # Each distinct answer is scored once: 3 for Mira, 3 for Tika.
  assert models.scored == 6
  # The same pool under a new RM that prefers the current iteration's dog over the pool's cat.
  stage, _ = make_stage(tk, tmp_path, {"Velloran.": 0.9, "cat.": 0.2, "dog.": 0.7},
                        pool=("rs_v1",))
  rows, counts = stage.generate(None, lambda m: None)
  assert picks(rows) == ["Mira lives in Velloran.", "Tika keeps a dog."]
  assert [r["source"] for r in rows] == ["current", "current"]
  assert counts["best_from_pool"] == 0


def test_distilled_prompts_missing_from_the_teachers_samples_fail(tk, tmp_path):
  write_samples(tk, tmp_path / "teacher" / "samples.jsonl", [["Mira lives in Velloran."], []])
  (tmp_path / "teacher" / "samples.jsonl").write_text(
      (tmp_path / "teacher" / "samples.jsonl").read_text().splitlines()[0] + "\n")
  stage, _ = make_stage(tk, tmp_path, {})
  with pytest.raises(ValueError, match="samples_from has no samples for 1 prompts, the first p:1"):
    stage.generate(None, lambda m: None)


# ---------------------------------------------------------------------------------------------
# Sampling survives a crash.

CFG = configs.get_preset("tiny", compute_dtype="float32", param_dtype="float32")


class Killed(Exception):
  """Stands for the process dying."""


def test_sampling_killed_between_chunks_resumes_to_the_same_samples(tmp_path, monkeypatch):
  policy = roles.create("policy", CFG, sharding.make_mesh(sharding.MeshConfig(1, 8, 1, 1)),
                        plan="rollout", seed=3)
  prompts = [[1, 5 + i, 9, 3 * i + 2] for i in range(10)]
  cfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=5, eos_id=2)
  run = lambda d, stats=None: best_of_k.chunked_samples(  # noqa: E731
      policy, prompts, 3, cfg, 7, 4, 8, str(d), lambda m: None, stats)
  whole = run(tmp_path / "whole")
  real, calls, kills = best_of_k.sample, [], []

  def killed_on_the_second_chunk(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 2 and not kills:
      kills.append(1)
      raise Killed
    return real(*args, **kwargs)

  monkeypatch.setattr(best_of_k, "sample", killed_on_the_second_chunk)
  with pytest.raises(Killed):
    run(tmp_path / "killed")
  calls.clear()
  stats = {}
  resumed = run(tmp_path / "killed", stats)
  # Chunks 2 and 3 (4 and 2 prompts) are sampled; chunk 1 is read back, not sampled again, and
  # its tokens do not count towards the rollout's tokens/s.
  assert [len(c) for c in calls] == [4, 2]
  assert stats["sampled_tokens"] == sum(len(a["tokens"]) for group in whole[4:] for a in group)
  assert resumed == whole and len(whole) == 10 and all(len(a) == 3 for a in whole)
  calls.clear()
  assert run(tmp_path / "killed") == whole and not calls  # a finished run samples nothing


class TokenSumRMs:
  """Reward models replaced by a rule that tells samples apart: (sum of the ids) mod 7, / 7."""

  seq_len = 256

  def score(self, sequences, is_safety):
    rewards = np.array([(int(np.sum(s)) % 7) / 7 for s in sequences])
    return {"reward": rewards, "helpful": rewards}


def test_held_out_samples_are_scored_prompt_by_prompt_with_a_fixed_key(tk, tmp_path):
  policy = roles.create("policy", CFG.replace(vocab_size=tk.vocab_size),
                        sharding.make_mesh(sharding.MeshConfig(1, 8, 1, 1)), plan="rollout", seed=3)
  prompts = [Prompt(f"p:{i}", ({"role": "user", "content": p},)) for i, p in enumerate(PROMPTS)]
  ranker = best_of_k.Ranker(TokenSumRMs(), tk)
  evaluate = lambda name, seed: best_of_k.held_out_eval(  # noqa: E731
      policy, ranker, prompts, 6, 8, str(tmp_path / f"{name}.jsonl"), samples_per_prompt=3,
      temperature=1.0, seed=seed)
  metrics, again, other_key = evaluate("a", 4), evaluate("b", 4), evaluate("c", 5)
  per_prompt = lambda name: [json.loads(l)["reward"] for l in  # noqa: E731
                             (tmp_path / f"{name}_samples.jsonl").read_text().splitlines()]
  # The slow reference: 3 samples per prompt drawn with the evaluation's key, scored one by one.
  tokens = [tk.encode_dialog([{"role": "user", "content": p}]).tokens.tolist() for p in PROMPTS]
  drawn = best_of_k.sample(policy, tokens, 3, sampling.SamplingConfig(
      temperature=1.0, max_new_tokens=6, eos_id=tk.eos_id), jax.random.key(4 + 1), 8)
  expected = [np.mean([(sum(t) + sum(a["tokens"])) % 7 / 7 for a in answers])
              for t, answers in zip(tokens, drawn)]
  np.testing.assert_allclose(per_prompt("a"), expected, atol=1e-12)
  assert metrics["rm_reward_sampled"] == pytest.approx(np.mean(expected), abs=1e-12)
  assert per_prompt("b") == per_prompt("a") and per_prompt("c") != per_prompt("a")
  assert "rm_reward_sampled" not in best_of_k.held_out_eval(
      policy, ranker, prompts, 6, 8, str(tmp_path / "greedy.jsonl"))
  assert not (tmp_path / "greedy_samples.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Bad input fails before any model is loaded.

@pytest.fixture()
def stage_dirs(tk, tmp_path):
  model_dir = tmp_path / "gatt"
  checkpoints.write_model_info(model_dir, CFG, "lm", tk.path)
  prompts = tmp_path / "world" / "prompts"
  prompts.mkdir(parents=True)
  for split in ("train", "eval"):
    (prompts / f"{split}.jsonl").write_text(json.dumps({"prompt": "How old is Mira?",
                                                        "answer": "40"}) + "\n")
  outputs = {"world": str(tmp_path / "world"), "gatt": str(model_dir),
             "tokenizer": str(model_dir)}
  ctx = common.StageContext("rs_v1", str(tmp_path / "rs_v1"), outputs, sharding.MeshConfig(), 0)
  return typed_config(llama2_chat.rs_stage("test", 1, "gatt"), "stages.rs_v1"), ctx


def test_valid_inputs_pass_validation(stage_dirs):
  cfg, ctx = stage_dirs
  inputs = rs.validate(cfg, ctx)
  assert [p.answer for p in inputs.prompts] == ["40"] and not inputs.pool


def test_a_pool_stage_that_never_sampled_fails_before_compute(stage_dirs):
  import dataclasses
  cfg, ctx = stage_dirs
  with pytest.raises(ValueError, match=r"stages.rs_v1.pool: 'gatt' has no samples.jsonl"):
    rs.validate(dataclasses.replace(cfg, pool=("gatt",)), ctx)


def test_a_bad_prompt_row_names_file_and_line(stage_dirs, tmp_path):
  cfg, ctx = stage_dirs
  path = tmp_path / "world" / "prompts" / "train.jsonl"
  path.write_text(path.read_text() + json.dumps({"prompt": "x", "is_safety": "yes"}) + "\n")
  with pytest.raises(Exception, match=r"train.jsonl:2"):
    rs.validate(cfg, ctx)


def test_the_gate_needs_a_safety_rm(stage_dirs):
  import dataclasses
  cfg, ctx = stage_dirs
  cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, safety=""))
  with pytest.raises(ValueError, match="reward.safety is empty"):
    rs.validate(cfg, ctx)


def test_the_safety_share_picks_the_first_prompts_of_each_kind_in_source_order():
  from data_pipelines.preferences import mix_by_safety
  prompts = [Prompt(f"p:{i}", (), is_safety=i in (1, 4, 5, 9)) for i in range(12)]
  mixed = mix_by_safety(prompts, 0.5, 6)
  assert [p.where for p in mixed] == ["p:0", "p:1", "p:2", "p:3", "p:4", "p:5"]
  # Unbounded: 4 safety prompts at a share of 0.25 allow 16 in all, the 8 helpful ones 10
  # (8 / 0.75), so 10, of which round(2.5) = 2 safety.
  mixed = mix_by_safety(prompts, 0.25, 0)
  assert sum(p.is_safety for p in mixed) == 2 and len(mixed) == 10
  assert [p.where for p in mix_by_safety(prompts, 1.0, 0)] == ["p:1", "p:4", "p:5", "p:9"]
  assert not any(p.is_safety for p in mix_by_safety(prompts, 0.0, 5))
  with pytest.raises(ValueError, match="needs both kinds"):
    mix_by_safety([p for p in prompts if not p.is_safety], 0.3)
