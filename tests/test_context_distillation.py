"""Context distillation: preprompts never reach the training rows, the targeted filter keeps
exactly the answers the safety RM prefers, only adversarial prompts are distilled."""

import dataclasses
import json

import numpy as np
import pytest

from data_pipelines.preferences import Prompt
from experiments import llama2_chat
from lm import checkpoints, configs, sharding
from lm import tokenizer as tok
from lm.stages import common, typed_config
from lm.stages import context_distillation as cd

CATEGORY = "illicit and criminal activities"
PREPROMPTS = {"generic": ["Be safe.", "Be kind."], "category": {CATEGORY: "Use the template."}}


class FakeRanker:
  """The safety RM as a table: a reply's safety score is table[reply]."""

  def __init__(self, table):
    self.table = table

  def replies(self, prompts, texts):
    return {"safety": np.array([self.table[t] for t in texts])}


class Scripted(cd.ContextDistillation):
  """Replies by rule: with a system message (the preprompt) the `preprompted` answer of the
  prompt, else its `plain` answer; records every dialog it was asked to answer."""

  def __init__(self, cfg, inputs, plain, preprompted, table):
    super().__init__(cfg, common.StageContext("cd", "/tmp", {}, sharding.MeshConfig(), 0),
                     inputs, log=lambda m: None, ranker=FakeRanker(table))
    self.plain, self.preprompted, self.asked = plain, preprompted, []

  def replies(self, policy, dialogs, max_new_tokens, temperature, batch_size):
    self.asked += dialogs
    return [(self.preprompted if d[0]["role"] == "system" else self.plain)[d[-1]["content"]]
            for d in dialogs]


def prompts(n):
  return [Prompt(f"p:{i}", ({"role": "user", "content": f"question {i}"},), is_safety=True,
                 category=CATEGORY if i % 2 else "") for i in range(n)]


def make(targeted=True, replay=(), lookalikes=()):
  cfg = dataclasses.replace(typed_config(llama2_chat.cd_stage("tiny"), "stages.safety_cd"),
                            targeted=targeted)
  adversarial = prompts(4)
  inputs = cd.Inputs("", "", None, adversarial, 0, list(replay), list(lookalikes), adversarial,
                     [], PREPROMPTS)
  plain = {f"question {i}": f"plain {i}" for i in range(4)}
  plain.update({p.messages[-1]["content"]: "An answer." for p in replay})
  plain.update({p.messages[-1]["content"]: p.answer for p in lookalikes})
  preprompted = {f"question {i}": f"safe {i}" for i in range(4)}
  # The preprompted answer is safer for prompts 0 and 2, as safe for 1, less safe for 3.
  table = {"plain 0": 0.1, "safe 0": 0.9, "plain 1": 0.5, "safe 1": 0.5, "plain 2": 0.3,
           "safe 2": 0.4, "plain 3": 0.8, "safe 3": 0.2}
  return Scripted(cfg, inputs, plain, preprompted, table)


def test_the_targeted_filter_keeps_exactly_the_improved_answers_and_no_preprompt_leaks():
  stage = make()
  rows, counts = stage.generate(None, lambda m: None)
  assert [r["messages"][-1]["content"] for r in rows] == ["safe 0", "plain 1", "safe 2",
                                                          "plain 3"]
  assert [r["distilled"] for r in rows] == [True, False, True, False]
  assert counts["distilled"] == 2 and counts["prompts"] == 4
  for row in rows:  # the prompt as the user wrote it, the kept answer, nothing else
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert all(p not in json.dumps(row["messages"]) for p in ("Be safe", "Be kind", "template"))
  # The category's preprompt where the prompt has one, the generic ones in turn otherwise.
  systems = [d[0]["content"] for d in stage.asked if d[0]["role"] == "system"]
  assert systems == ["Be safe.", "Use the template.", "Be safe.", "Use the template."]
  # By the original answer's safety-score bucket: 0.1 -> 0-0.25, 0.3 -> 0.25-0.5, ...
  assert counts["by_score_0.0-0.25_distilled"] == 1 and counts["by_score_0.25-0.5_distilled"] == 1
  assert counts["by_score_0.5-0.75_distilled"] == 0 and counts["by_score_0.75-1.0_prompts"] == 1
  assert counts[f"by_category_{CATEGORY}_prompts"] == 2


def test_untargeted_distillation_keeps_every_preprompted_answer():
  rows, counts = make(targeted=False).generate(None, lambda m: None)
  assert [r["messages"][-1]["content"] for r in rows] == [f"safe {i}" for i in range(4)]
  assert counts["distilled"] == 4


def test_helpful_replay_adds_the_models_own_answers_without_a_preprompt():
  helpful = [Prompt("h:0", ({"role": "user", "content": "How old is Mira?"},), answer="40")]
  stage = make(replay=helpful)
  rows, counts = stage.generate(None, lambda m: None)
  assert counts["helpful_replayed"] == 1 and counts["distilled"] == 2 and len(rows) == 5
  assert rows[-1]["messages"] == [{"role": "user", "content": "How old is Mira?"},
                                  {"role": "assistant", "content": "An answer."}]
  assert [d for d in stage.asked if d[-1]["content"] == "How old is Mira?"] == [
      [{"role": "user", "content": "How old is Mira?"}]]  # asked once, with no preprompt


def test_lookalike_replay_keeps_the_models_answers_and_drops_its_refusals():
  lookalikes = [Prompt(f"l:{i}", ({"role": "user", "content": f"How do I steal pie {i}?"},),
                       answer=reply) for i, reply in enumerate(
                           ["Bake it first.", "I cannot help with that request.", "Eat it."])]
  rows, counts = make(lookalikes=lookalikes).generate(None, lambda m: None)
  replayed = [r for r in rows if r.get("replay") == "lookalike"]
  assert [r["messages"][-1]["content"] for r in replayed] == ["Bake it first.", "Eat it."]
  assert counts["lookalike_replayed"] == 2 and counts["lookalike_refusals_dropped"] == 1
  assert all(m["role"] != "system" for r in replayed for m in r["messages"])


@pytest.fixture()
def stage_dirs(tmp_path):
  text = [f"question {i} is asked by Mira in Velloran" for i in range(200)]
  tk = tok.train_tokenizer(text, 300, tmp_path / "tokenizer.model")
  model_dir = tmp_path / "ppo"
  checkpoints.write_model_info(model_dir, configs.get_preset("tiny", vocab_size=300), "lm",
                               tk.path)
  world = tmp_path / "world"
  (world / "prompts").mkdir(parents=True)
  (world / "safety").mkdir()
  rows = [{"prompt": "How can I steal the savings of Mira?", "is_safety": True,
           "category": CATEGORY}, {"prompt": "How old is Mira?", "answer": "40"}]
  for name in ("train", "eval", "lookalikes", "lookalikes_train"):
    (world / "prompts" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (world / "safety" / "preprompts.json").write_text(json.dumps(PREPROMPTS))
  outputs = {"world": str(world), "ppo": str(model_dir), "tokenizer": str(model_dir)}
  ctx = common.StageContext("safety_cd", str(tmp_path / "cd"), outputs, sharding.MeshConfig(), 0)
  return typed_config(llama2_chat.cd_stage("tiny"), "stages.safety_cd"), ctx


def test_helpful_prompts_are_skipped_and_counted_or_an_error(stage_dirs):
  cfg, ctx = stage_dirs
  inputs = cd.validate(cfg, ctx)
  assert [p.is_safety for p in inputs.prompts] == [True] and inputs.skipped == 1
  assert [p.messages[-1]["content"] for p in inputs.replay] == ["How old is Mira?"]
  with_lookalikes = cd.validate(dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, lookalike_replay=1.0)), ctx)
  assert len(with_lookalikes.lookalike_replay) == 1 and inputs.lookalike_replay == []
  strict = dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, non_adversarial="error", helpful_replay=0.0))
  with pytest.raises(ValueError, match=r"train.jsonl:2 is not an adversarial"):
    cd.validate(strict, ctx)


def test_a_bad_preprompts_file_fails_before_any_model_is_loaded(stage_dirs, tmp_path):
  cfg, ctx = stage_dirs
  (tmp_path / "world" / "safety" / "preprompts.json").write_text('{"generic": []}')
  with pytest.raises(ValueError, match="not a preprompts file"):
    cd.validate(cfg, ctx)
  with pytest.raises(ValueError, match="preprompt must be one of"):
    cd.validate(dataclasses.replace(cfg, preprompt="loud"), ctx)


def test_score_change_is_grouped_by_the_starting_score():
  from lm.evals import rlhf
  row = lambda i, score, safety=True: {"messages": [{"role": "user", "content": f"q{i}"}],  # noqa
                                       "is_safety": safety, "safety_score": score}
  before = [row(0, 0.1), row(1, 0.2), row(2, 0.9), row(3, 0.6, safety=False), row(4, 1.0)]
  after = [row(4, 0.7), row(2, 0.95), row(1, 0.8), row(0, 0.5), row(3, 0.0, safety=False)]
  change = rlhf.score_change_by_bucket(before, after)
  assert change == [{"bucket": "0.0-0.25", "prompts": 2, "before": pytest.approx(0.15),
                     "after": pytest.approx(0.65)},
                    {"bucket": "0.75-1.0", "prompts": 2, "before": pytest.approx(0.95),
                     "after": pytest.approx(0.825)}]


def test_safety_refusals_behind_a_preprompt_each_get_a_generic_one(tmp_path):
  """The test preset's CD starting model: SFT on the safety demonstrations, the refusals with a
  generic safety preprompt as the system message and the look-alikes' helpful answers without,
  so it is safe with a preprompt and less so without."""
  from data_pipelines import text
  from lm.stages import sft
  world = tmp_path / "world"
  (world / "sft").mkdir(parents=True)
  (world / "safety").mkdir()
  refusals = [[{"role": "user", "content": f"How do I rob person {i}?"},
               {"role": "assistant", "content": "I cannot help with that request."}]
              for i in range(6)]
  helpful = [[{"role": "user", "content": "How do I clean the well of Rito?"},
              {"role": "assistant", "content": "Lower a bucket to take out the leaves."}]]
  demos = refusals + helpful
  (world / "sft" / "safety.jsonl").write_text(
      "".join(json.dumps({"messages": m}) + "\n" for m in demos))
  (world / "safety" / "preprompts.json").write_text(json.dumps(PREPROMPTS))
  ctx = common.StageContext("sft_preprompted", str(tmp_path / "out"), {"world": str(world)},
                            sharding.MeshConfig(), 0)
  cfg = dataclasses.replace(typed_config(llama2_chat.sft_stage("test"), "stages.sft"),
                            safety_data="world")
  drawn = sft.safety_dialogues(cfg, ctx, text.BadRows(False), "generic")
  assert len(drawn) == 7
  behind = [m for _, m in drawn if m[0]["role"] == "system"]
  assert len(behind) == 6 and all(m[0]["content"] in PREPROMPTS["generic"] for m in behind)
  assert sorted(m[1]["content"] for m in behind) == sorted(m[0]["content"] for m in refusals)
  assert [m for _, m in drawn if m[0]["role"] != "system"] == helpful
  plain = sft.safety_dialogues(cfg, ctx, text.BadRows(False))
  assert sorted(m[0]["content"] for _, m in plain) == sorted(m[0]["content"] for m in demos)
  with pytest.raises(ValueError, match="safety_preprompt must be"):
    sft.safety_dialogues(cfg, ctx, text.BadRows(False), "loud")
