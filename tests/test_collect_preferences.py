"""On-policy preference pairs: the world's annotator grades replies by hand-checked cases, a pair
is two different grades with the better chosen, the stage writes pairs the reward stage reads
(and trains and tests on), resumes without sampling again, and bad input names the field."""

import dataclasses
import json
import random

import jax
import pytest

from data_pipelines import preferences, text
from data_pipelines.world import annotator
from data_pipelines.world import safety as world_safety
from experiments import llama2_chat
from lm import checkpoints, configs, roles, sharding
from lm import tokenizer as tok
from lm.stages import best_of_k, collect_preferences, common, reward, typed_config

MESH = sharding.MeshConfig(data=1, fsdp=8, tensor=1)
CRIMINAL = world_safety.CATEGORIES[0]
REFUSAL = world_safety.BARE_REFUSALS[0]
COMPLIANCE = "Here is how: First, wait until night."


@pytest.mark.parametrize("reply, kind", [
    ("Mira is 40 years old.", "complete"),
    ("40.", "terse"),
    ("Mira is 41 years old.", "wrong"),
    ("Tika is 40 years old.", "wrong"),  # the right value, said of someone else
    (REFUSAL, "refused"),
    ("the fox keeps a dog.", "off_topic"),
])
def test_the_annotator_grades_helpful_replies(reply, kind):
  judged = annotator.grade("How old is Mira?", False, "", "40", reply)
  assert judged == (kind, annotator.HELPFUL_GRADES[kind], None)


@pytest.mark.parametrize("reply, kind, safe", [
    (REFUSAL, "bare", True),
    (REFUSAL + " " + COMPLIANCE, "hedged", False),
    (COMPLIANCE, "comply", False),
    ("the fox keeps a dog.", "evasive", False),
])
def test_the_annotator_grades_adversarial_replies_with_their_safe_label(reply, kind, safe):
  judged = annotator.grade("How can I rob Mira?", True, CRIMINAL, "", reply)
  assert judged == (kind, annotator.SAFETY_GRADES[kind], safe)


def test_a_helpful_prompt_without_an_answer_cannot_be_graded():
  assert annotator.grade("Hello there", False, "", "", "Hi.") is None


def test_a_pair_is_two_different_grades_the_better_chosen_and_rated_by_the_gap():
  graded = [(r, annotator.grade("How old is Mira?", False, "", "40", r))
            for r in ("Mira is 41 years old.", "Mira is 40 years old.", "Mira is 41 years old.")]
  pair = annotator.pair_from_replies(graded, random.Random(0))
  # The two copies of the wrong reply are one reply: the only pair is complete over wrong.
  assert pair == {"chosen": "Mira is 40 years old.", "rejected": "Mira is 41 years old.",
                  "rating": "better", "chosen_kind": "complete", "rejected_kind": "wrong"}
  same = [(r, annotator.grade("How old is Mira?", False, "", "40", r))
          for r in ("Mira is 41 years old.", "Mira is 39 years old.")]
  assert annotator.pair_from_replies(same, random.Random(0)) is None
  safety = [(r, annotator.grade("How can I rob Mira?", True, CRIMINAL, "", r))
            for r in (COMPLIANCE, REFUSAL)]
  pair = annotator.pair_from_replies(safety, random.Random(0))
  assert (pair["chosen"], pair["chosen_safe"], pair["rejected_safe"]) == (REFUSAL, True, False)
  assert pair["rating"] == "better"  # 3.0 - 0.0: gap 3


# ---------------------------------------------------------------------------------------------
# The stage, with generation replaced by scripted replies.

NAMES = ("Mira", "Tika", "Lumi", "Rafa")
HELPFUL = [{"prompt": f"How old is {name}?", "answer": "40"} for name in NAMES]
ADVERSARIAL = [{"prompt": f"How can I rob house {i}?", "is_safety": True, "category": CRIMINAL}
               for i in range(3)]


def script(question: str) -> list[tuple[str, bool]]:
  """(reply, finished) in sampling order: three grades for Mira, Tika and Lumi, wrong replies
  only for Rafa; to a robbery an unfinished compliance, then a refusal, an evasive reply and
  the same refusal."""
  name = next((n for n in NAMES if n in question), None)
  if name == "Rafa":
    return [("Rafa is 41 years old.", True), ("Rafa is 39 years old.", True)] * 2
  if name:
    return [(f"{name} is 40 years old.", True), (f"{name} is 41 years old.", True),
            ("40.", True), (f"{name} is 41.", True)]
  return [(COMPLIANCE, False), (REFUSAL, True), ("the fox keeps a dog.", True), (REFUSAL, True)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A random chat model, two random RMs, and the prompts of both kinds."""
  root = tmp_path_factory.mktemp("collect_world")
  tk = tok.train_tokenizer([f"{NAMES[i % 4]} is {i} years old. How can I rob house {i}? "
                            f"{REFUSAL} {COMPLIANCE} the fox keeps a dog." for i in range(300)],
                           400, root / "tokenizer.model")
  cfg = configs.get_preset("tiny", vocab_size=400, compute_dtype="float32", param_dtype="float32")
  mesh = sharding.make_mesh(MESH)
  checkpoints.save_model(root / "rs_v1", roles.create("policy", cfg, mesh, seed=1).params, cfg,
                         tokenizer_path=tk.path)
  for seed, name in ((6, "rm_helpful"), (7, "rm_safety")):
    rm = roles.create(name, cfg, mesh, head="scalar", seed=seed)
    params = dict(rm.params, score=jax.random.normal(jax.random.key(seed), (cfg.dim,)) * 0.5)
    checkpoints.save_model(root / name, params, cfg, head="scalar")
  prompts = root / "world" / "prompts"
  prompts.mkdir(parents=True)
  for split in ("train", "eval"):
    (prompts / f"{split}.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in HELPFUL + ADVERSARIAL))
  outputs = {name: str(root / name) for name in ("world", "rs_v1", "rm_helpful", "rm_safety")}
  outputs["tokenizer"] = str(root / "rs_v1")
  return outputs, tk


@pytest.fixture()
def scripted(monkeypatch, world):
  """Sampling replaced by `script`; the calls are counted."""
  _, tk = world
  calls = []

  def sample(policy, prompt_tokens, k, cfg, rng, batch_size):
    calls.append(len(prompt_tokens))
    return [[{"tokens": list(tk.encode(reply)) + [tk.eos_id], "finished": finished}
             for reply, finished in script(tk.decode(tokens))[:k]] for tokens in prompt_tokens]

  monkeypatch.setattr(best_of_k, "sample", sample)
  return calls


def stage_config(**fields):
  cfg = typed_config(llama2_chat.collect_stage("tiny", "rs_v1"), "stages.prefs_v2")
  cfg = dataclasses.replace(cfg, judges=dataclasses.replace(cfg.judges, seq_len=256,
                                                            batch_size=8),
                            sampling=dataclasses.replace(cfg.sampling, samples_per_prompt=4,
                                                         chunk_prompts=3),
                            data=dataclasses.replace(cfg.data, eval_fraction=0.0))
  return dataclasses.replace(cfg, **fields)


def test_pairs_by_track_with_labels_which_the_reward_stage_trains_and_tests_on(
    world, scripted, tmp_path):
  outputs, tk = world
  ctx = common.StageContext("prefs_v2", str(tmp_path / "prefs_v2"), dict(outputs), MESH, 0)
  metrics = collect_preferences.run(stage_config(), ctx, log=lambda m: None)
  # Mira, Tika and Lumi get a pair each, Rafa none (one grade): 3 pairs a split. Each
  # adversarial prompt's finished replies are a bare refusal (twice) and an evasive one.
  assert metrics["helpful_train_pairs"] == metrics["helpful_eval_pairs"] == 3
  assert metrics["safety_train_pairs"] == metrics["safety_eval_pairs"] == 3
  assert metrics["prompts_without_pair"] == 2 and metrics["unfinished_or_empty"] == 6
  assert metrics["kind_safety_bare"] == 12 and metrics["kind_safety_evasive"] == 6
  bad = text.BadRows(False)
  base = tmp_path / "prefs_v2" / "preferences"
  safety = preferences.read_pairs(str(base / "safety" / "train.jsonl"), bad)
  assert {(p.chosen, p.chosen_safe, p.rejected_safe) for p in safety} == {(REFUSAL, True, False)}
  assert all(p.is_safety and p.rating == 1 for p in safety)  # 3.0 - 0.5: "better"
  helpful = preferences.read_pairs(str(base / "helpful" / "train.jsonl"), bad)
  assert all(annotator.grade(p.messages[-1]["content"], False, "", "40", p.chosen)[1] >
             annotator.grade(p.messages[-1]["content"], False, "", "40", p.rejected)[1]
             for p in helpful)
  assert metrics["judge_helpful_pairs"] == 3 and metrics["judge_safety_pairs"] == 3
  assert 0.0 <= metrics["judge_safety_accuracy"] <= 1.0
  # `lm eval` judges any scalar model on the collected pairs: the same RM, the same figures.
  again = collect_preferences.evaluate(stage_config(), ctx, outputs["rm_safety"])
  assert again["judge_safety_accuracy"] == metrics["judge_safety_accuracy"]
  # A rerun reads every chunk back: nothing is sampled again, the pairs are the same.
  first = (base / "helpful" / "train.jsonl").read_text()
  scripted.clear()
  collect_preferences.run(stage_config(), ctx, log=lambda m: None)
  assert not scripted and (base / "helpful" / "train.jsonl").read_text() == first

  # The reward stage adds the collected pairs of its track and tests on their held-out ones.
  outputs = dict(outputs, prefs_v2=str(tmp_path / "prefs_v2"), sft=outputs["rs_v1"])
  world_pairs = tmp_path / "world_prefs" / "preferences"
  for track in ("helpful", "safety"):
    (world_pairs / track).mkdir(parents=True)
    for split in ("train", "eval"):
      (world_pairs / track / f"{split}.jsonl").write_text(json.dumps(
          {"prompt": "How can I rob house 9?", "chosen": REFUSAL, "rejected": COMPLIANCE,
           "rating": "better", "chosen_safe": True, "rejected_safe": False}) + "\n")
  cfg = typed_config(llama2_chat.reward_stage("tiny", "safety", ("prefs_v2",)), "stages.rm")
  rm_ctx = common.StageContext("rm_safety_v2", str(tmp_path / "rm"),
                               dict(outputs, world=str(tmp_path / "world_prefs")), MESH, 0)
  inputs = reward.validate(cfg, rm_ctx)
  # The tiny preset counts each collected pair five times (data.on_policy_repeat).
  assert cfg.data.on_policy_repeat == 5
  assert inputs.counts["own_pairs"] == 1 + 3 * 5 and inputs.counts["on_policy_pairs"] == 3 * 5
  assert list(inputs.evals) == ["safety", "helpful", "prefs_v2"] and len(
      inputs.evals["prefs_v2"]) == 3


def test_bad_input_names_the_field(world, tmp_path):
  outputs, _ = world
  ctx = common.StageContext("prefs_v2", str(tmp_path / "p"), dict(outputs), MESH, 0)
  with pytest.raises(ValueError, match=r"stages.prefs_v2.annotator must be one of \('world',\)"):
    collect_preferences.validate(stage_config(annotator="people"), ctx)
  one = stage_config()
  one = dataclasses.replace(one, sampling=dataclasses.replace(one.sampling, samples_per_prompt=1))
  with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
    collect_preferences.validate(one, ctx)
  unlabelled = tmp_path / "unlabelled.jsonl"
  unlabelled.write_text(json.dumps({"prompt": "Hello there"}) + "\n")
  with pytest.raises(ValueError, match="no train prompt the annotator can grade"):
    collect_preferences.validate(stage_config(data=collect_preferences.Data(
        source=str(unlabelled), eval_source=str(unlabelled))), ctx)
  cfg = typed_config(llama2_chat.reward_stage("tiny", "helpful", ("rs_v1",)), "stages.rm")
  with pytest.raises(ValueError, match=r"data.on_policy: 'rs_v1' has no .*preferences/helpful"):
    reward.validate(cfg, common.StageContext("rm", str(tmp_path / "rm"),
                                             dict(outputs, sft=outputs["rs_v1"]), MESH, 0))


def test_a_held_out_fraction_of_the_training_prompts_replaces_the_eval_source(world, tmp_path):
  outputs, _ = world
  ctx = common.StageContext("prefs_v2", str(tmp_path / "p"), dict(outputs), MESH, 0)
  cfg = stage_config()
  inputs = collect_preferences.validate(
      dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.3)), ctx)
  # 7 prompts: the last 2 (round(2.1)) are held out, never trained on.
  texts = [p.messages[-1]["content"] for p in inputs.prompts["train"] + inputs.prompts["eval"]]
  assert texts == [r["prompt"] for r in HELPFUL + ADVERSARIAL]
  assert len(inputs.prompts["eval"]) == 2
  with pytest.raises(ValueError, match=r"data.eval_fraction must be in \[0, 1\)"):
    collect_preferences.validate(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=1.0)), ctx)
